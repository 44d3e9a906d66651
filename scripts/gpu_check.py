#!/usr/bin/env python
"""GPU check: the compiled Pallas (Triton) kernels against their references, then timings, in ONE run.

Meant for a lent GPU machine, where device time is short: every section is independent (an error in one
is recorded and the next runs), sections after `--deadline` seconds are skipped, and the JSON is
rewritten after each section so a killed run still leaves its results.

    PYTHONUNBUFFERED=1 python scripts/gpu_check.py --out gpu_out/gpu_check.json [--deadline 420]

Correctness: relative error ||out - ref|| / ||ref|| (and the same for the gradients of a random linear
functional of the output), computed in float64 numpy, with fresh random inputs per check. The
reference is the slow obvious form (token loop / dense T x T / brute-force top-k) at matmul precision
'highest'; the XLA path is scored against the same reference, so kernel and XLA error can be compared.
Timings: median wall time (ms) of compiled calls after a warm-up, compile time excluded; ratios are
taken against a baseline timed in the same run.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HIGHEST = "highest"
INTERPRET = False  # --smoke: run the Pallas kernels in interpret mode at small shapes (CPU check of this script)
SMOKE = False
COMPARE_ROWS = ""  # --rows: a regex on model_compare's "width/row" keys (default: all)
UNROLL_SWEEP = False  # section unroll_sweep: model_compare's code on unroll_configs() at 16 segments
COMPILE_WORKERS = 8  # --compile-workers: model_compare's parallel XLA compiles
COMPILE_LIMIT = 0.0  # --compile-limit: model_compare gives up on rows not compiled after this many s (0: none)
ABANDONED_COMPILES = False  # set when a compile thread was left running: main() then exits without joining it
PROGRESS_PATH = ""  # <--out>.partial.json: model_compare's results so far, rewritten after every row


def save_progress(section: dict) -> None:
    """Write a section's results so far: a run cut by the device's time limit in the middle of a long section
    (session 15: model_compare at 4K context compiled for > 6 min and left nothing) still leaves what it did."""
    if PROGRESS_PATH:
        with open(PROGRESS_PATH, "w") as f:
            json.dump(section, f, indent=1, default=str)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def all_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x, np.float64)))) for x in jax.tree.leaves(tree))


def median_ms(fn, args, iters: int = 20) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up, excluded
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def value_and_grads(fn, args, argnums, cot):
    """out and d<out, cot>/d args[argnums], jitted."""
    def loss(*a):
        out = fn(*a)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(out.astype(jnp.float32) * cot), out

    g = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))
    grads, out = g(*args)
    return out, grads


# --------------------------------------------------------------------------------------- sections
def section_env() -> dict:
    import flax
    import optax

    dev = jax.devices()[0]
    return dict(jax=jax.__version__, flax=flax.__version__, optax=optax.__version__, backend=jax.default_backend(),
                device=str(dev), device_kind=getattr(dev, "device_kind", "?"))


def _chunked_inputs(B, T, d, seed):
    from pallas_kernels.chunked_memory.bench import make_inputs

    return make_inputs(T, d, B, depth=1, seed=seed)


def section_chunked_correct() -> dict:
    from pallas_kernels.chunked_memory.reference import chunked_memory_reference
    from pallas_kernels.chunked_memory.triton import chunked_memory_triton
    from pallas_kernels.chunked_memory.xla import chunked_memory_xla

    out = {}
    # (B, T, d, chunk, retrieve_after_update, grad_clip): a clip near the median token-gradient norm of these
    # inputs (~2 sqrt(d)) exercises both branches of the clipped hand-written backward
    shapes = [(4, 256, 64, 16, False, 0.0), (4, 512, 64, 64, True, 0.0), (2, 256, 128, 32, False, 0.0),
              (4, 256, 64, 16, False, 16.0)]
    for seed, (B, T, d, b, after, clip) in enumerate([(2, 64, 16, 16, True, 8.0)] if SMOKE else shapes):
        q, k, v, th, eta, al, params, mom = _chunked_inputs(B, T, d, seed)
        kw = dict(chunk_size=b, retrieve_after_update=after, grad_clip=clip)
        cot = jnp.asarray(np.random.default_rng(100 + seed).normal(size=(B, T, d)), jnp.float32)
        args = (q, k, v, th, eta, al, params[0], mom[0])

        def wrap(f, kw=kw, **extra):
            def call(*xs):  # q, k, v, theta, eta, alpha, W, S with the memory state as single arrays
                return f(*xs[:6], (xs[6],), (xs[7],), **kw, **extra)
            return call

        argnums = (0, 1, 2, 3, 4, 5, 6)
        with jax.default_matmul_precision(HIGHEST):
            y_ref, g_ref = value_and_grads(wrap(chunked_memory_reference), args, argnums, cot)
            fwd_ref = jax.jit(wrap(chunked_memory_reference))(*args)
        res = {}
        impls = (("triton", wrap(chunked_memory_triton, interpret=INTERPRET)), ("xla", wrap(chunked_memory_xla)))
        for name, f in impls:
            y, g = value_and_grads(f, args, argnums, cot)
            fwd = jax.jit(f)(*args)
            res[name] = dict(
                y=rel(y, y_ref), W_final=rel(fwd[1][0], fwd_ref[1][0]), S_final=rel(fwd[2][0], fwd_ref[2][0]),
                grads=max(rel(a, r) for a, r in zip(g, g_ref)), finite=all_finite((y, g, fwd)))
        out[f"B{B}_T{T}_d{d}_chunk{b}_after{int(after)}" + (f"_clip{clip:g}" if clip else "")] = res
    return out


def section_chunked_deep() -> dict:
    """The deep-memory Triton kernel (triton_deep.py, depth 2, written without a GPU) against the token loop
    (float64 relative error of y, final state and input gradients), then timed against the XLA factored path
    it would replace, forward and forward + backward. Each shape is separate: a kernel that does not compile at
    one size (register or shared-memory limits) is recorded as an error there and the next shape runs."""
    from pallas_kernels.chunked_memory.bench import make_inputs
    from pallas_kernels.chunked_memory.reference import chunked_memory_reference
    from pallas_kernels.chunked_memory.triton_deep import chunked_memory_triton_deep
    from pallas_kernels.chunked_memory.xla import chunked_memory_xla

    out = {}
    correct = [(2, 64, 16, 32, 16, True)] if SMOKE else [(4, 256, 64, 128, 16, False), (4, 256, 64, 128, 64, True)]
    timed = [(2, 64, 16, 32, 16)] if SMOKE else [(128, 512, 64, 128, 16), (128, 512, 64, 128, 64),
                                                  (64, 512, 128, 256, 16)]
    triton_fn = functools.partial(chunked_memory_triton_deep, interpret=INTERPRET)
    for seed, (B, T, d, hid, b, after) in enumerate(correct):
        key = f"correct_B{B}_T{T}_d{d}_h{hid}_chunk{b}_after{int(after)}"
        try:
            args = make_inputs(T, d, B, depth=2, hidden=hid, seed=seed)
            kw = dict(chunk_size=b, retrieve_after_update=after)
            cot = jnp.asarray(np.random.default_rng(200 + seed).normal(size=(B, T, d)), jnp.float32)
            argnums = (0, 1, 2, 3, 4, 5, 6)
            with jax.default_matmul_precision(HIGHEST):
                f_ref = functools.partial(chunked_memory_reference, **kw)
                y_ref, g_ref = value_and_grads(f_ref, args, argnums, cot)
                st_ref = jax.jit(f_ref)(*args)
            res = {}
            for name, f in (("triton", triton_fn), ("xla", chunked_memory_xla)):
                f = functools.partial(f, **kw)
                y, g = value_and_grads(f, args, argnums, cot)
                st = jax.jit(f)(*args)
                res[name] = dict(y=rel(y, y_ref), state=max(rel(a, r) for a, r in zip(jax.tree.leaves(st[1:]),
                                                                                     jax.tree.leaves(st_ref[1:]))),
                                 grads=max(rel(a, r) for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref))),
                                 finite=all_finite((y, g, st)))
            out[key] = res
        except Exception as err:  # noqa: BLE001 - recorded, the next shape runs
            out[key] = {"error": f"{type(err).__name__}: {err}"[:2000]}
    for B, T, d, hid, b in timed:
        key = f"time_B{B}_T{T}_d{d}_h{hid}_chunk{b}"
        row = {}
        try:
            args = make_inputs(T, d, B, depth=2, hidden=hid, seed=0)
            impls = (("xla", chunked_memory_xla), ("triton", triton_fn),
                     ("triton_8warps", functools.partial(triton_fn, num_warps=8)))
            for name, f in impls:
                fwd = jax.jit(lambda *a, f=f, b=b: f(*a, chunk_size=b)[0])

                def fb(*a, f=f, b=b):
                    return jax.grad(lambda q, k, v, p: jnp.sum(f(q, k, v, *a[3:6], p, a[7], chunk_size=b)[0]),
                                    (0, 1, 2, 3))(*a[:3], a[6])

                row[f"{name}_fwd_ms"] = median_ms(fwd, args, 10)
                row[f"{name}_fwd_bwd_ms"] = median_ms(jax.jit(fb), args, 10)
            for tri in ("triton", "triton_8warps"):
                for ph in ("fwd", "fwd_bwd"):
                    row[f"xla_over_{tri}_{ph}"] = row[f"xla_{ph}_ms"] / row[f"{tri}_{ph}_ms"]
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {err}"[:2000]
        out[key] = row
    return out


def section_landmark_correct() -> dict:
    from pallas_kernels.landmark_attention.reference import landmark_attention_reference
    from pallas_kernels.landmark_attention.triton import landmark_attention_triton
    from pallas_kernels.landmark_attention.xla import landmark_attention_xla

    out = {}
    shapes = [(2, 4, 1024, 64, 64, jnp.float32), (2, 4, 1024, 128, 32, jnp.float32), (2, 4, 2048, 64, 64, jnp.bfloat16)]
    for seed, (B, H, T, D, L, dt) in enumerate([(1, 2, 64, 16, 16, jnp.float32)] if SMOKE else shapes):
        r = np.random.default_rng(seed)
        q, k, v = (jnp.asarray(r.normal(size=(B, H, T, D)), dt) for _ in range(3))
        cot = jnp.asarray(r.normal(size=(B, H, T, D)), jnp.float32)
        with jax.default_matmul_precision(HIGHEST):
            ref32 = lambda q, k, v, L=L: landmark_attention_reference(  # noqa: E731
                q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), block_size=L)
            o_ref, g_ref = value_and_grads(ref32, (q, k, v), (0, 1, 2), cot)
        res = {}
        triton_fn = functools.partial(landmark_attention_triton, interpret=INTERPRET)
        for name, f in (("triton", triton_fn), ("xla", landmark_attention_xla)):
            o, g = value_and_grads(lambda q, k, v, f=f, L=L: f(q, k, v, block_size=L), (q, k, v), (0, 1, 2), cot)
            res[name] = dict(out=rel(o, o_ref), grads=max(rel(a, r_) for a, r_ in zip(g, g_ref)),
                             finite=all_finite((o, g)))
        out[f"B{B}_H{H}_T{T}_D{D}_L{L}_{jnp.dtype(dt).name}"] = res
    return out


def _pkm_inputs(t, h, k_dim, sqrt_n, d_v, seed, dt=jnp.float32):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(t, h, k_dim)), dt)
    k1 = jnp.asarray(r.normal(size=(h, sqrt_n, k_dim // 2)) / np.sqrt(k_dim), dt)
    k2 = jnp.asarray(r.normal(size=(h, sqrt_n, k_dim // 2)) / np.sqrt(k_dim), dt)
    v = jnp.asarray(r.normal(size=(sqrt_n * sqrt_n, d_v)), dt)
    return q, k1, k2, v


def section_pkm_correct() -> dict:
    from pallas_kernels.pkm_lookup.reference import pkm_lookup_reference
    from pallas_kernels.pkm_lookup.triton import pkm_lookup_triton
    from pallas_kernels.pkm_lookup.xla import pkm_lookup_xla

    out = {}
    shapes = [(512, 4, 64, 128, 128, 32), (300, 2, 32, 64, 64, 8)]
    for seed, (t, h, k_dim, sqrt_n, d_v, top_k) in enumerate([(20, 2, 32, 16, 16, 4)] if SMOKE else shapes):
        q, k1, k2, v = _pkm_inputs(t, h, k_dim, sqrt_n, d_v, seed)
        cot = jnp.asarray(np.random.default_rng(50 + seed).normal(size=(t, d_v)), jnp.float32)
        with jax.default_matmul_precision(HIGHEST):
            ref_fn = functools.partial(pkm_lookup_reference, top_k=top_k)
            ref = jax.jit(ref_fn)(q, k1, k2, v)
            _, g_ref = value_and_grads(ref_fn, (q, k1, k2, v), (0, 1, 2, 3), cot)
        res = {}
        for name, f in (("triton", functools.partial(pkm_lookup_triton, interpret=INTERPRET, top_k=top_k)),
                        ("xla", functools.partial(pkm_lookup_xla, top_k=top_k))):
            got = jax.jit(f)(q, k1, k2, v)
            _, g = value_and_grads(f, (q, k1, k2, v), (0, 1, 2, 3), cot)
            # Top-k membership can flip on near-ties under a different summation order: report how many
            # tokens chose exactly the reference's slots, and score out/grads on all tokens anyway.
            same = np.all(np.sort(np.asarray(got[1]), -1) == np.sort(np.asarray(ref[1]), -1), axis=(1, 2))
            res[name] = dict(tokens_same_slots=float(same.mean()), out=rel(got[0], ref[0]),
                             out_same_slot_tokens=rel(np.asarray(got[0])[same], np.asarray(ref[0])[same]),
                             grads=max(rel(a, r_) for a, r_ in zip(g, g_ref)), finite=all_finite((got[0], g)))
        out[f"t{t}_h{h}_k{k_dim}_sqrtn{sqrt_n}_dv{d_v}_top{top_k}"] = res
    return out


def _fwd_and_grad(f, b: int):
    """Jitted y of a chunked-memory function f (chunk size b) and jitted grads of sum(y) w.r.t. q, k, v."""
    fwd = jax.jit(lambda *a: f(*a, chunk_size=b)[0])
    fb = jax.jit(lambda *a: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, *a[3:], chunk_size=b)[0]), (0, 1, 2))(*a[:3]))
    return fwd, fb


def section_chunked_time() -> dict:
    from pallas_kernels.chunked_memory.reference import chunked_memory_reference
    from pallas_kernels.chunked_memory.triton import chunked_memory_triton
    from pallas_kernels.chunked_memory.xla import chunked_memory_xla

    out = {}
    for B, T, d, b in [(2, 64, 16, 16)] if SMOKE else [(32, 4096, 64, 64), (64, 8192, 64, 64)]:
        args = _chunked_inputs(B, T, d, 0)
        fns = {"sequential": chunked_memory_reference, "xla_chunked": chunked_memory_xla,
               "triton": functools.partial(chunked_memory_triton, interpret=INTERPRET)}
        row = {}
        for name, f in fns.items():
            fwd, fb = _fwd_and_grad(f, b)
            row[f"{name}_fwd_ms"] = median_ms(fwd, args, 10)
            row[f"{name}_fwd_bwd_ms"] = median_ms(fb, args, 10)
        for ph in ("fwd", "fwd_bwd"):
            row[f"sequential_over_triton_{ph}"] = row[f"sequential_{ph}_ms"] / row[f"triton_{ph}_ms"]
            row[f"sequential_over_xla_{ph}"] = row[f"sequential_{ph}_ms"] / row[f"xla_chunked_{ph}_ms"]
            row[f"xla_over_triton_{ph}"] = row[f"xla_chunked_{ph}_ms"] / row[f"triton_{ph}_ms"]
        out[f"B{B}_T{T}_d{d}_chunk{b}"] = row
    return out


def section_chunked_model_shapes() -> dict:
    """The linear Triton kernel at the shapes the model_compare rows run (one call = one layer and segment):
    MAG d512 (16 x 4 memory heads of d_h 128, 512 tokens, chunks of 16 and 64: a 128 x 128 float32 state pair
    per program, which may spill registers at 4 warps) and the 170M paper setting at GPT-2-small width (16 x 12
    heads of 64, chunk 64). XLA against Triton at 4 and 8 warps and split over 1, 2 or 4 blocks of value
    columns per sequence (v_blocks: less state per program, more programs), forward and forward + backward
    w.r.t. q, k, v."""
    from pallas_kernels.chunked_memory.triton import chunked_memory_triton
    from pallas_kernels.chunked_memory.xla import chunked_memory_xla

    out = {}
    shapes = [(2, 64, 16, 16)] if SMOKE else [(64, 512, 128, 64), (64, 512, 128, 16), (192, 512, 64, 64)]
    for B, T, d, b in shapes:
        key = f"B{B}_T{T}_d{d}_chunk{b}"
        try:
            args = _chunked_inputs(B, T, d, 0)
            fns = {"xla": chunked_memory_xla}
            variants = [(4, 1), (4, 4)] if SMOKE else [(w, vb) for w, vb in ((4, 1), (8, 1), (4, 2), (8, 2), (4, 4))
                                                       if d // vb >= 16]
            for warps, vb in variants:
                fns[f"triton_w{warps}_v{vb}"] = functools.partial(chunked_memory_triton, interpret=INTERPRET,
                                                                  num_warps=warps, v_blocks=vb)
            row, outs = {}, {}
            for name, f in fns.items():
                try:  # one variant failing to compile (e.g. Triton's shared-memory limit) must not lose the others
                    fwd, fb = _fwd_and_grad(f, b)
                    row[f"{name}_fwd_ms"] = median_ms(fwd, args, 10)
                    row[f"{name}_fwd_bwd_ms"] = median_ms(fb, args, 10)
                    outs[name] = (fwd(*args), fb(*args))
                except Exception as e:
                    row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:200]
            for name in outs:  # the compiled kernels agree with XLA (both at the default TF32 matmul precision)
                row[f"{name}_rel_diff_vs_xla"] = max(rel(outs[name][0], outs["xla"][0]),
                                                     max(rel(a, r) for a, r in zip(outs[name][1], outs["xla"][1])))
            for warps, vb in variants:
                for ph in ("fwd", "fwd_bwd"):
                    t = f"triton_w{warps}_v{vb}"
                    if t in outs:
                        row[f"xla_over_{t}_{ph}"] = row[f"xla_{ph}_ms"] / row[f"{t}_{ph}_ms"]
            out[key] = row
        except Exception as e:  # one shape failing to compile must not lose the others
            out[key] = dict(error=f"{type(e).__name__}: {e}"[:400])
    return out


def section_coefficients_time() -> dict:
    """The chunk coefficients (xla.chunk_coefficients) forward + backward, all three forms: on CPU the
    sequential scan over the chunk's positions is 1.4-3.2x faster than the associative scans and the doubling
    closed form (no loop, ~44 batched matmuls, forward + backward) 4-18x slower; GPU keeps the associative scans
    until this says which is fastest there. Shapes: MAG's d512 rows (batch 16 x 8 memory heads, 512-token
    segments, chunks of 16 and 64) and the chunked_time shape."""
    from pallas_kernels.chunked_memory import xla

    out = {}
    shapes = [(4, 64, 16)] if SMOKE else [(128, 512, 16), (128, 512, 64), (32, 4096, 64)]
    for B, T, b in shapes:
        r = np.random.default_rng(0)
        gates = tuple(jnp.asarray(x, jnp.float32) for x in (0.02 * r.uniform(size=(B, T)),
                                                             r.uniform(0.5, 0.9, size=(B, T)),
                                                             0.01 * r.uniform(size=(B, T))))
        row, grads = {}, {}
        for scan in ("associative", "sequential", "doubling"):
            def loss(*g, scan=scan, b=b):
                c = xla.coefficients_batched(*g, b, False, scan)
                return sum(jnp.sum(jnp.sin(x)) for x in c.values())
            fb = jax.jit(jax.grad(loss, (0, 1, 2)))
            row[f"{scan}_fwd_bwd_ms"] = median_ms(fb, gates, 20)
            grads[scan] = fb(*gates)
        for scan in ("sequential", "doubling"):
            row[f"{scan}_over_associative"] = row[f"{scan}_fwd_bwd_ms"] / row["associative_fwd_bwd_ms"]
            row[f"{scan}_grad_rel_diff"] = max(rel(a, c) for a, c in zip(grads[scan], grads["associative"]))
        out[f"B{B}_T{T}_chunk{b}"] = row
    return out


def section_landmark_time() -> dict:
    from pallas_kernels.landmark_attention.reference import landmark_attention_reference
    from pallas_kernels.landmark_attention.triton import landmark_attention_triton
    from pallas_kernels.landmark_attention.xla import landmark_attention_xla

    out = {}
    for B, H, T, D, L in [(1, 2, 64, 16, 16)] if SMOKE else [(4, 8, 4096, 64, 64), (1, 8, 16384, 128, 64)]:
        r = np.random.default_rng(0)
        q, k, v = (jnp.asarray(r.normal(size=(B, H, T, D)), jnp.bfloat16) for _ in range(3))
        fns = {"triton": functools.partial(landmark_attention_triton, interpret=INTERPRET),
               "xla": landmark_attention_xla}
        if T <= 4096:
            fns["dense_reference"] = landmark_attention_reference
        row = {}
        for name, f in fns.items():
            fwd = jax.jit(lambda q, k, v, f=f, L=L: f(q, k, v, block_size=L))
            fb = jax.jit(jax.grad(lambda q, k, v, f=f, L=L: jnp.sum(f(q, k, v, block_size=L).astype(jnp.float32)),
                                  (0, 1, 2)))
            row[f"{name}_fwd_ms"] = median_ms(fwd, (q, k, v))
            row[f"{name}_fwd_bwd_ms"] = median_ms(fb, (q, k, v))
        for ph in ("fwd", "fwd_bwd"):
            row[f"xla_over_triton_{ph}"] = row[f"xla_{ph}_ms"] / row[f"triton_{ph}_ms"]
            if "dense_reference" in fns:
                row[f"dense_over_triton_{ph}"] = row[f"dense_reference_{ph}_ms"] / row[f"triton_{ph}_ms"]
        # causal-attention FLOPs (QK^T and PV, half the square): a rate to compare with the bf16 ceiling
        flops = 2 * 2 * B * H * T * T * D / 2
        row["triton_fwd_tflops"] = flops / (row["triton_fwd_ms"] * 1e-3) / 1e12
        out[f"B{B}_H{H}_T{T}_D{D}_L{L}_bf16"] = row
    return out


def section_pkm_time() -> dict:
    from pallas_kernels.pkm_lookup.triton import pkm_lookup_triton
    from pallas_kernels.pkm_lookup.xla import pkm_lookup_xla

    out = {}
    for t, h, k_dim, sqrt_n, d_v, top_k in ([(32, 2, 32, 16, 16, 4)] if SMOKE else
                                            [(8192, 4, 128, 512, 512, 32), (8192, 4, 128, 1024, 1024, 32)]):
        args = _pkm_inputs(t, h, k_dim, sqrt_n, d_v, 0, jnp.bfloat16)
        row = {}
        for name, f in (("triton", functools.partial(pkm_lookup_triton, interpret=INTERPRET, top_k=top_k)),
                        ("xla", functools.partial(pkm_lookup_xla, top_k=top_k))):
            fwd = jax.jit(lambda *a, f=f: f(*a)[0])
            fb = jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a)[0].astype(jnp.float32)), (0, 1, 2, 3)))
            row[f"{name}_fwd_ms"] = median_ms(fwd, args)
            row[f"{name}_fwd_bwd_ms"] = median_ms(fb, args)
        for ph in ("fwd", "fwd_bwd"):
            row[f"xla_over_triton_{ph}"] = row[f"xla_{ph}_ms"] / row[f"triton_{ph}_ms"]
        out[f"t{t}_h{h}_k{k_dim}_N{sqrt_n * sqrt_n}_dv{d_v}_top{top_k}_bf16"] = row
    return out


GPU_MODEL = "model.d_model=512;model.n_heads=8;model.n_kv_heads=8;model.d_ff=1536;model.n_layers=4;" \
            "model.dtype=bfloat16;train.batch_size=16"
# RMT's paper backbone (configs/paper/rmt_gpt2_small.yaml's width, depth and vocabulary), without remat
GPT2S_MODEL = "model.vocab_size=50257;model.d_model=768;model.n_heads=12;model.n_kv_heads=12;model.d_ff=2048;" \
              "model.n_layers=12;model.dtype=bfloat16;train.batch_size=16"
TINY = "configs/tiny/"


def unroll_configs() -> list[tuple[str, str, str]]:
    """16 segments: the segment scan rolled and unrolled (model.segment_unroll), and its compile time. (Session 5
    also timed a partial unroll, 2 and 4 of 16, with an integer form of the option: no gain; BENCHMARKS.md.)"""
    rows = [("baseline", TINY + "baseline.yaml", "model.segment_local=true")]
    rows += [(f"rmt_m0_{tag}", TINY + "rmt.yaml", f"model.rmt.num_mem_tokens=0;model.segment_unroll={u}")
             for tag, u in (("rolled", "false"), ("unrolled", "true"))]
    rows += [("rmt", TINY + "rmt.yaml", "")]
    return rows


def compare_configs(width: str) -> list[tuple[str, str, str]]:
    """(row name, config, overrides) of one model_compare width. rmt_m0 = RMT with no memory tokens: the
    segment-local baseline run one segment after another, i.e. the cost of the sequential scan alone."""
    if width == "d512x16":
        return unroll_configs()
    if width == "d512_4k":  # the paper's 4K context (8 segments of 512), the same tokens per step as d512
        keep = ("baseline", "baseline_full_attention", "baseline_full_attention_qb512", "titans_mag_c64_unroll8",
                "titans_mag_c64_unroll8_rolled", "titans_mag_c64_unroll8_rolled_no_chunk_ckpt",
                "titans_mag_c64_unroll8_rolled_w512",
                "titans_mag_c64_unroll8_parallel_retrieval",
                "titans_mag_c64_unroll8_rolled_parallel_retrieval",
                "titans_mag_c64_unroll8_pipelined_parallel_retrieval",
                "titans_mag_c64_unroll8_pipelined", "titans_mag_c64_unroll8_no_chunk_ckpt",
                "titans_mag_c64_unroll8_pipelined_no_chunk_ckpt", "titans_mag_c64_unroll8_pipelined_qb128")
        return [r for r in compare_configs("d512") if r[0] in keep]
    rows = [("baseline", TINY + "baseline.yaml", "model.segment_local=true"),
            ("rmt_m0", TINY + "rmt.yaml", "model.rmt.num_mem_tokens=0"),
            ("rmt", TINY + "rmt.yaml", "" if width == "d512" else "model.rmt.num_mem_tokens=16"),
            ("hmt", TINY + "hmt.yaml", ""), ("lm2", TINY + "lm2.yaml", "")]
    # the same with the segment scan rolled into a while loop (model.segment_unroll=false, the default before
    # session 5): what unrolling it gains
    rows += [(name + "_rolled", path, ";".join(o for o in (extra, "model.segment_unroll=false") if o))
             for name, path, extra in rows[1:3 if SMOKE else 5]]
    if width == "d512":
        rows += [("titans_mag", TINY + "titans_mag.yaml", ""),
                 ("titans_mag_linear", TINY + "titans_mag.yaml", "model.titans.memory_depth=1"),
                 # where MAG's 11.9x (session 5) goes: the layers without any neural memory (sliding window,
                 # persistent tokens, carry), and chunks of 64 (the paper configs': 4x fewer serial chunk
                 # steps); against full causal attention over the whole 4-segment context too
                 ("titans_mag_no_memory", TINY + "titans_mag.yaml", "model.titans.memory_layers=[]"),
                 ("titans_mag_c64", TINY + "titans_mag.yaml", "model.titans.chunk_size=64"),
                 ("titans_mag_linear_c64", TINY + "titans_mag.yaml",
                  "model.titans.memory_depth=1;model.titans.chunk_size=64"),
                 # since session 11 api.py runs XLA (with a log line) for shapes outside the Triton kernels'
                 # MEASURED_FIT: at d512 titans_mag_linear_c64, titans_mag_triton and titans_mag_triton_c64 are
                 # outside it, so they now time the XLA path
                 ("titans_mag_triton", TINY + "titans_mag.yaml", "model.titans.implementation=triton"),
                 # the XLA chunk loop 8 chunks per iteration: 4 loop iterations per segment instead of 32, each
                 # a host round trip on a GPU (session 8)
                 ("titans_mag_unroll8", TINY + "titans_mag.yaml", "model.titans.scan_unroll=8"),
                 # the two levers together: chunks of 64 with the whole segment's 8 chunks unrolled (no chunk
                 # loop left), and the deep Triton kernel at chunks of 64 (session 11)
                 ("titans_mag_c64_unroll8", TINY + "titans_mag.yaml",
                  "model.titans.chunk_size=64;model.titans.scan_unroll=8"),
                 ("titans_mag_triton_c64", TINY + "titans_mag.yaml",
                  "model.titans.implementation=triton;model.titans.chunk_size=64"),
                 # the same with the segment loop rolled (model.segment_unroll=false): one copy of the 4 layers'
                 # 32 chunk steps in the program instead of one per segment. Session 15's lease compiled the
                 # unrolled d512_4k rows for > 6 min on the H200 and timed none; on CPU rolling halves the compile
                 # (32.1 -> 14.8 s at d512_4k), at the cost of a while loop over segments on the GPU
                 ("titans_mag_c64_unroll8_rolled", TINY + "titans_mag.yaml",
                  "model.titans.chunk_size=64;model.titans.scan_unroll=8;model.segment_unroll=false"),
                 # the paper configs' attention: a window of 512 (1,039 keys per query with 16 persistent
                 # tokens, against 579 at the tiny config's window of 64 and 4 persistent tokens; session 18)
                 ("titans_mag_c64_unroll8_rolled_w512", TINY + "titans_mag.yaml",
                  "model.titans.chunk_size=64;model.titans.scan_unroll=8;model.segment_unroll=false;"
                  "model.titans.window=512;model.titans.num_persistent=16"),
                 # the chunk loop carries only the memory state; the retrievals (8 of a depth-2 chunk step's 15
                 # matmuls) run after it for all chunks at once (session 15; equal values, tested)
                 ("titans_mag_c64_unroll8_parallel_retrieval", TINY + "titans_mag.yaml",
                  "model.titans.chunk_size=64;model.titans.scan_unroll=8;model.titans.parallel_retrieval=true"),
                 ("titans_mag_c64_unroll8_rolled_parallel_retrieval", TINY + "titans_mag.yaml",
                  "model.titans.chunk_size=64;model.titans.scan_unroll=8;model.segment_unroll=false;"
                  "model.titans.parallel_retrieval=true"),
                 ("titans_mag_c64_unroll8_pipelined_parallel_retrieval", TINY + "titans_mag.yaml",
                  "model.titans.chunk_size=64;model.titans.scan_unroll=8;model.titans.pipeline_layers=true;"
                  "model.titans.parallel_retrieval=true"),
                 # the layers pipelined over segments (session 12): 4 + 4 - 1 = 7 sequential block calls, the active
                 # layers' chunk loops batched into one, instead of 16 (titans_pipeline.py; equal values, tested)
                 ("titans_mag_pipelined", TINY + "titans_mag.yaml", "model.titans.pipeline_layers=true"),
                 ("titans_mag_c64_unroll8_pipelined", TINY + "titans_mag.yaml",
                  "model.titans.chunk_size=64;model.titans.scan_unroll=8;model.titans.pipeline_layers=true"),
                 # without the per-chunk checkpoint of the chunk loop (session 13): the backward reuses the
                 # forward's chunk intermediates instead of running every chunk's forward again (a quarter of
                 # the memory's kernels, if the step is bound by their number)
                 ("titans_mag_c64_unroll8_no_chunk_ckpt", TINY + "titans_mag.yaml",
                  "model.titans.chunk_size=64;model.titans.scan_unroll=8;model.titans.chunk_remat=false"),
                 ("titans_mag_c64_unroll8_rolled_no_chunk_ckpt", TINY + "titans_mag.yaml",
                  "model.titans.chunk_size=64;model.titans.scan_unroll=8;model.segment_unroll=false;"
                  "model.titans.chunk_remat=false"),
                 ("titans_mag_c64_unroll8_pipelined_no_chunk_ckpt", TINY + "titans_mag.yaml",
                  "model.titans.chunk_size=64;model.titans.scan_unroll=8;model.titans.pipeline_layers=true;"
                  "model.titans.chunk_remat=false"),
                 # the tiny configs clip inner gradients since session 9; session 5's 11.9x was without the clip
                 ("titans_mag_no_clip", TINY + "titans_mag.yaml", "model.titans.inner_grad_clip=0.0"),
                 ("baseline_full_attention", TINY + "baseline.yaml", ""),
                 # attention 512 queries at a time (session 13; on CPU the full-attention baseline got faster and
                 # half as big with query blocks, so the baseline MAG is held to should be timed with them too)
                 ("baseline_full_attention_qb512", TINY + "baseline.yaml", "model.attention_q_block=512"),
                 ("titans_mag_c64_unroll8_pipelined_qb128", TINY + "titans_mag.yaml",
                  "model.titans.chunk_size=64;model.titans.scan_unroll=8;model.titans.pipeline_layers=true;"
                  "model.attention_q_block=128")]
    if width == "gpt2s":  # MAG with configs/paper/titans_170m.yaml's memory settings at the width of that model
        paper_mag = (f"model.titans.memory_heads={4 if SMOKE else 12};model.titans.chunk_size=64;"
                     "model.titans.window=512;model.titans.num_persistent=16;model.titans.max_lr=0.01;"
                     "model.titans.inner_grad_clip=0.0")
        rows += [("titans_mag_paper", TINY + "titans_mag.yaml", paper_mag),
                 ("titans_mag_paper_linear", TINY + "titans_mag.yaml", paper_mag + ";model.titans.memory_depth=1"),
                 ("titans_mag_paper_triton", TINY + "titans_mag.yaml",
                  paper_mag + ";model.titans.implementation=triton"),
                 ("titans_mag_paper_unroll8", TINY + "titans_mag.yaml", paper_mag + ";model.titans.scan_unroll=8"),
                 ("titans_mag_paper_unroll8_pipelined", TINY + "titans_mag.yaml",
                  paper_mag + ";model.titans.scan_unroll=8;model.titans.pipeline_layers=true"),
                 ("titans_mag_paper_unroll8_pipelined_no_chunk_ckpt", TINY + "titans_mag.yaml",
                  paper_mag + ";model.titans.scan_unroll=8;model.titans.pipeline_layers=true;"
                  "model.titans.chunk_remat=false"),
                 ("baseline_full_attention", TINY + "baseline.yaml", "")]
    # with the per-layer remat of the paper configs, with and without the per-segment checkpoint
    # (model.segment_remat=false: one forward fewer per step); ratios against the baseline with the same remat
    full = "model.remat=full"
    rows += [("baseline_remat", TINY + "baseline.yaml", "model.segment_local=true;" + full)]
    rows += [(f"{name}_remat{tag}", path, ";".join(o for o in (extra, full, sr) if o))
             for name, path, extra in rows[2:3 if SMOKE else 5]
             for tag, sr in (("", ""), ("_no_segment_remat", "model.segment_remat=false"))]
    return rows


def _load_bench():
    """scripts/bench.py as a module (its _Bench builds, compiles and times one config's train step)."""
    import importlib.util

    sys.argv = ["bench.py"]
    spec = importlib.util.spec_from_file_location("bench", os.path.join(os.path.dirname(__file__), "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _compile_all(benches: dict, out: dict, workers: int, limit: float = 0.0) -> None:
    """Compile the lowered _Bench objects at once in a thread pool; one that fails is moved from benches to
    out[key] = {"error": ...} so the others still run. Each finished compile is printed and saved at once.
    limit > 0: rows still compiling after `limit` s are given up the same way, so that the rows which did compile
    are timed (session 15: one slow compile held back every row of its process until the device time ran out)."""
    global ABANDONED_COMPILES
    from concurrent.futures import ThreadPoolExecutor, as_completed

    t0 = time.perf_counter()

    def compile_one(key, b):
        try:
            b.compile()
            return None
        except Exception as e:
            return f"{type(e).__name__}: {e}"[:400]

    pool = ThreadPoolExecutor(max_workers=workers)
    futures = {pool.submit(compile_one, key, b): key for key, b in benches.items()}
    try:
        for fut in as_completed(futures, timeout=limit or None):
            key, err = futures[fut], fut.result()
            if err:
                out[key] = dict(error=err)
                benches.pop(key)
            else:
                out.setdefault("compile_seconds", {})[key] = round(benches[key].compile_s, 1)
            print(f"model_compare: compiled {key} at {time.perf_counter() - t0:.1f} s"
                  f"{' ERROR ' + err if err else ''}", flush=True)
            save_progress(out)
    except TimeoutError:
        for fut, key in futures.items():
            if not fut.done():
                fut.cancel()
                out[key] = dict(error=f"compile not finished after {limit:g} s (--compile-limit)")
                benches.pop(key)
                print(f"model_compare: gave up compiling {key} after {limit:g} s", flush=True)
        # they keep a CPU core busy while the others are timed: the host-bound rows (MAG) can only look slower
        out["compiles_left_running"] = sorted(k for f, k in futures.items() if not f.done())
        ABANDONED_COMPILES = True
        save_progress(out)
    pool.shutdown(wait=not ABANDONED_COMPILES, cancel_futures=True)


def section_model_compare() -> dict:
    """Train-step time per token of each memory model against the segment-local baseline, at two widths, in one
    process: every config lowered, all compiled at once in a thread pool, then timed round-robin per width."""
    bench = _load_bench()
    # width -> (model overrides, segment length, segments); d512_4k: 8 segments of 512 at half the batch
    widths = {"d512": (GPU_MODEL, 512, 4), "gpt2s": (GPT2S_MODEL, 512, 4),
              "d512_4k": (GPU_MODEL + ";train.batch_size=8", 512, 8)}
    if SMOKE:
        widths = {"d512": ("train.batch_size=2", 64, 2), "gpt2s": ("train.batch_size=2;model.vocab_size=1000", 64, 2),
                  "d512_4k": ("train.batch_size=1", 64, 4)}
    if UNROLL_SWEEP:
        widths = {"d512x16": (widths["d512"][0], 512, 16)}
    out, benches = {}, {}
    t0 = time.perf_counter()
    for width, (model, seg, n) in widths.items():
        for name, path, extra in compare_configs(width):
            key = f"{width}/{name}"
            if not re.search(COMPARE_ROWS, key):
                continue
            try:
                b = bench._Bench(path, [o for o in (model + ";" + extra).split(";") if o], seg, n, compile=False)
                benches[key] = b
                print(f"model_compare: lowered {key} in {b.lower_s:.1f} s", flush=True)
            except Exception as e:  # one config failing to build must not lose the others
                out[key] = dict(error=f"{type(e).__name__}: {e}"[:400])
    out["lower_s"] = round(time.perf_counter() - t0, 1)
    save_progress(out)
    t0 = time.perf_counter()
    _compile_all(benches, out, workers=COMPILE_WORKERS, limit=COMPILE_LIMIT)
    out["compile_wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"model_compare: lowered in {out['lower_s']} s, compiled {len(benches)} in {out['compile_wall_s']} s",
          flush=True)
    for width in widths:
        mine = {k: b for k, b in benches.items() if k.startswith(width + "/")}
        for _ in range(3):
            for key, b in mine.items():
                try:
                    b.run(5)
                except Exception as e:
                    out[key] = dict(error=f"{type(e).__name__}: {e}"[:400])
        mine = {k: b for k, b in mine.items() if k not in out}
        res = {k: b.result() for k, b in mine.items()}
        for key, r in res.items():
            remat_row = key.endswith(("_remat", "_remat_no_segment_remat"))  # the per-layer remat rows
            base = res.get(f"{width}/baseline_remat" if remat_row else f"{width}/baseline")
            out[key] = dict(config=r["config"], step_ms=r["step_s"] * 1e3, tokens_per_sec=r["tokens_per_sec"],
                            compile_s=r.get("compile_s"), params=r["params"], temp_mib=r.get("temp_mib"),
                            time_per_token_vs_segment_local=(r["sec_per_token"] / base["sec_per_token"]
                                                             if base else None))
            print(f"model_compare {key}: {out[key]}", flush=True)
            save_progress(out)
        for b in mine.values():  # free the device buffers before the next width
            b.params = b.opt = b.carry = b.compiled = None
    return out


def compare_summary(sections: list[dict]) -> list[str]:
    """One line per timed model_compare row of the given sections (several runs may share a width): step ms and
    time per token against the segment-local and the full-attention baseline of the same width and run.
    A row is only compared with the baselines of its own run (the numbers of another process are not comparable)."""
    lines = []
    for sec in sections:
        rows = {k: v for k, v in sec.items() if isinstance(v, dict) and "step_ms" in v}
        for key, r in sorted(rows.items()):
            width = key.split("/")[0]
            full = rows.get(f"{width}/baseline_full_attention")
            vs_full = full["tokens_per_sec"] / r["tokens_per_sec"] if full else None
            local = r.get("time_per_token_vs_segment_local")
            lines.append(f"{key}: {r['step_ms']:.1f} ms, vs segment-local "
                         f"{f'{local:.2f}x' if local else '-'}, vs full attention "
                         f"{f'{vs_full:.2f}x' if vs_full else '-'}")
        lines += [f"{k}: {v['error']}" for k, v in sorted(sec.items()) if isinstance(v, dict) and "error" in v]
    return lines


PROFILE_ROWS = ("baseline", "titans_mag", "titans_mag_c64", "titans_mag_no_memory", "titans_mag_c64_unroll8_pipelined")


def _kernel_family(name: str) -> str:
    """'loop_multiply_fusion.12' -> 'loop_multiply_fusion': one entry per kind of kernel, not per instance."""
    prev = None
    while prev != name:
        prev, name = name, re.sub(r"[._]\d+$", "", name)
    return name


def trace_summary(trace_dir: str, n_steps: int) -> dict:
    """Per-step kernel statistics from a jax.profiler perfetto trace: how many kernels the device ran, how long
    it was busy (union of kernel intervals), and the kernel families that took the most time. A step whose busy
    time is far under its wall time is bound by launches and host work, not by the kernels themselves.
    Device rows are the trace's '/device:...' processes; without any (CPU), the XLA worker threads of '/host:CPU'."""
    import glob
    import gzip
    from collections import defaultdict

    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    meta = [e for e in events if e.get("ph") == "M"]
    procs = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e.get("name") == "thread_name"}
    on_device = {pid for pid, name in procs.items() if name.startswith("/device:")}
    if on_device:  # the CUDA streams; other rows of a device process (e.g. "XLA Ops") repeat the same kernels
        rows = {key for key in threads if key[0] in on_device}
        streams = {key for key in rows if threads[key].startswith("Stream")}
        rows = streams or rows
    else:
        rows = {key for key, name in threads.items() if name.startswith("tf_XLAEigen")}
    keep = lambda e: (e["pid"], e["tid"]) in rows or (not rows and e["pid"] in on_device)
    kernels = [e for e in events if e.get("ph") == "X" and "dur" in e and keep(e)]
    busy, end = 0.0, float("-inf")
    for e in sorted(kernels, key=lambda e: float(e["ts"])):  # union of [ts, ts + dur] intervals, in us
        t0, t1 = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        busy += max(0.0, t1 - max(t0, end))
        end = max(end, t1)
    fam = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        f = fam[_kernel_family(e["name"])]
        f[0] += 1
        f[1] += float(e["dur"])
    top = sorted(fam.items(), key=lambda kv: -kv[1][1])[:20]
    return dict(rows=sorted(f"{procs.get(pid, pid)}/{threads[pid, tid]}" for pid, tid in rows),
                kernels_per_step=len(kernels) / n_steps,
                busy_ms_per_step=busy / 1e3 / n_steps, kernel_ms_per_step=sum(float(e["dur"]) for e in kernels) / 1e3
                / n_steps, top_families=[dict(name=k[:80], per_step=c / n_steps, ms_per_step=t / 1e3 / n_steps)
                                         for k, (c, t) in top])


def section_mag_profile() -> dict:
    """Where a MAG training step's GPU time goes, from a profiler trace of 3 steps per row (d512 width, as in
    model_compare): kernels per step, device busy time against wall time, the top kernel families. MAG without
    memory and the baseline beside it say which kernels the neural memory adds."""
    import tempfile

    bench = _load_bench()
    model = "train.batch_size=2" if SMOKE else GPU_MODEL
    seg, n = (64, 2) if SMOKE else (512, 4)
    out, steps, benches = {}, 3, {}
    for name, path, extra in compare_configs("d512"):
        if name in PROFILE_ROWS:
            try:
                benches[name] = bench._Bench(path, [o for o in (model + ";" + extra).split(";") if o], seg, n,
                                             compile=False)
            except Exception as e:
                out[name] = dict(error=f"{type(e).__name__}: {e}"[:400])

    _compile_all(benches, out, workers=4)  # compiling is most of this section's time
    for name, b in benches.items():
        try:
            b.run(steps)  # untraced step times (after its own warm-up), beside the traced ones
            trace_dir = tempfile.mkdtemp(prefix="mag_profile_")
            t0 = time.perf_counter()
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                b.run(steps, record=False)
            wall_ms = (time.perf_counter() - t0) * 1e3 / steps
            row = dict(step_ms_untraced=statistics.median(b.times) * 1e3, wall_ms_per_step=wall_ms,
                       **trace_summary(trace_dir, steps))
            # tracing slows the host side, so the busy share is also given against the untraced step time
            row["busy_fraction"] = row["busy_ms_per_step"] / wall_ms
            row["busy_fraction_of_untraced_step"] = row["busy_ms_per_step"] / row["step_ms_untraced"]
            out[name] = row
            b.params = b.opt = b.carry = b.compiled = None
        except Exception as e:
            out[name] = dict(error=f"{type(e).__name__}: {e}"[:400])
        print(f"mag_profile {name}: {json.dumps(out[name])[:600]}", flush=True)
    return out


RECALL_BACKBONE = {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 512}
MAC = {"variant": "mac", "memory_depth": 1, "memory_heads": 2, "chunk_size": 8, "max_lr": 0.05, "num_persistent": 4}
RECALL_RUNS = {  # name: (model, stages [(n_segments, steps)], segment_len, lr)
    "rmt": ({"kind": "rmt", "rmt": {"num_mem_tokens": 8}}, [(2, 500), (3, 2500)], 8, 1e-3),
    "hmt": ({"kind": "hmt", "hmt": {"num_sensory": 8, "cache_size": 4, "recall_dim": 64}}, [(2, 300), (3, 2500)], 8,
            1e-3),
    "lm2": ({"kind": "lm2", "lm2": {"num_slots": 8, "num_heads": 4}}, [(3, 3000)], 8, 2e-3),
    "titans_mac": ({"kind": "titans", "titans": MAC}, [(2, 3000)], 16, 3e-3),
}


def section_recall() -> dict:
    """Associative recall (tests/memory/test_recall_learning.py's task and evaluation) with a larger backbone
    than the CPU tests use, to see whether the ~75% "set, not binding" plateau is a capacity limit."""
    from tests.memory import test_recall_learning as trl

    trl.BACKBONE.update(RECALL_BACKBONE)
    out = {"backbone": dict(trl.BACKBONE), "batch": 64}
    runs = {"rmt": ({"kind": "rmt", "rmt": {"num_mem_tokens": 8}}, [(2, 20), (3, 20)], 8, 1e-3)} if SMOKE \
        else RECALL_RUNS
    for name, (model, stages, seg, lr) in runs.items():
        t0 = time.perf_counter()
        try:
            r = trl.train(model, stages, segment_len=seg, lr=lr, batch=64)
            out[name] = dict(acc=r["acc"], per_answer=r["per_answer"], stages=stages, lr=lr,
                             train_s=round(r["train_s"], 1), wall_s=round(time.perf_counter() - t0, 1))
        except Exception as e:
            out[name] = dict(error=f"{type(e).__name__}: {e}"[:400])
        print(f"recall {name}: {out[name]}", flush=True)
    return out


# Long recall runs, several at once: each job is its own process (tiny models leave the GPU mostly idle, so
# concurrent processes fill it). name: (model, stages, segment_len, pairs, lr, min_lr_ratio)
RECALL_JOBS = {
    "rmt_cosine_lr1e-3": ({"kind": "rmt", "rmt": {"num_mem_tokens": 8}}, [(2, 1000), (3, 5000)], 8, 2, 1e-3, 0.1),
    "rmt_const_lr3e-3": ({"kind": "rmt", "rmt": {"num_mem_tokens": 8}}, [(2, 1000), (3, 5000)], 8, 2, 3e-3, 1.0),
    "hmt_const_lr1e-3": ({"kind": "hmt", "hmt": {"num_sensory": 8, "cache_size": 4, "recall_dim": 64}},
                         [(2, 1000), (3, 5000)], 8, 2, 1e-3, 1.0),
    "lm2_const_lr3e-3": ({"kind": "lm2", "lm2": {"num_slots": 8, "num_heads": 4}}, [(3, 6000)], 8, 2, 3e-3, 1.0),
    "mac_const_lr3e-3": ({"kind": "titans", "titans": MAC}, [(2, 4000)], 16, 2, 3e-3, 1.0),
}
RECALL_JOB_SECONDS = 185.0


def recall_job(name: str) -> None:
    """One long recall run (the CI backbone: d_model 64, 2 layers; batch 64); prints a JSON line."""
    from tests.memory import test_recall_learning as trl

    model, stages, seg, pairs, lr, min_lr = RECALL_JOBS[name]
    if SMOKE:
        stages = [(n, 10) for n, _ in stages]
    t0 = time.perf_counter()
    r = trl.train(model, stages, segment_len=seg, pairs=pairs, lr=lr, batch=64, log_every=500,
                  train_extra={"min_lr_ratio": min_lr})
    print("RESULT " + json.dumps(dict(job=name, acc=r["acc"], per_answer=r["per_answer"], steps=r["steps"],
                                      train_s=round(r["train_s"], 1), wall_s=round(time.perf_counter() - t0, 1))),
          flush=True)


def section_recall_long() -> dict:
    import subprocess

    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    procs = {n: subprocess.Popen([sys.executable, __file__, "--recall-job", n] + (["--smoke"] if SMOKE else []),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for n in RECALL_JOBS}
    deadline = time.perf_counter() + RECALL_JOB_SECONDS
    out = {}
    for n, p in procs.items():
        try:
            text, _ = p.communicate(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            text += "\nKILLED at the deadline"
        lines = [ln for ln in text.splitlines() if ln.startswith(("RESULT", "  step", "KILLED", "Traceback"))
                 or "Error" in ln]
        res = [json.loads(ln[7:]) for ln in lines if ln.startswith("RESULT")]
        out[n] = dict(result=res[0] if res else None, log=[ln.strip() for ln in lines if not ln.startswith("RESULT")])
        print(f"recall_long {n}: {json.dumps(out[n])}", flush=True)
    return out


def section_unroll_sweep() -> dict:
    global UNROLL_SWEEP
    UNROLL_SWEEP = True
    try:
        return section_model_compare()
    finally:
        UNROLL_SWEEP = False


SECTIONS = {
    "env": section_env,
    "chunked_correct": section_chunked_correct,
    "landmark_correct": section_landmark_correct,
    "pkm_correct": section_pkm_correct,
    "chunked_time": section_chunked_time,
    "chunked_model_shapes": section_chunked_model_shapes,
    "chunked_deep": section_chunked_deep,
    "coefficients_time": section_coefficients_time,
    "landmark_time": section_landmark_time,
    "pkm_time": section_pkm_time,
    "recall": section_recall,
    "recall_long": section_recall_long,
    "model_compare": section_model_compare,
    "unroll_sweep": section_unroll_sweep,
    "mag_profile": section_mag_profile,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_out/gpu_check.json")
    p.add_argument("--deadline", type=float, default=420.0, help="skip sections that start after this many s")
    p.add_argument("--only", default="", help="comma-separated section names (default: all)")
    p.add_argument("--smoke", action="store_true", help="CPU check of this script: interpreted kernels, small shapes")
    p.add_argument("--rows", default="", help="model_compare: only the rows whose 'width/name' matches this regex")
    p.add_argument("--compile-workers", type=int, default=8, help="model_compare: XLA compiles run at once")
    p.add_argument("--compile-limit", type=float, default=0.0, help="model_compare: time the rows compiled within "
                   "this many s and record the others as not compiled (default 0: wait for all)")
    p.add_argument("--cache-dir", default="", help="JAX's persistent compilation cache (a later run with the same "
                   "jax, GPU and rows loads the compiled steps instead of compiling them again)")
    p.add_argument("--summarize", nargs="+", default=[], metavar="JSON",
                   help="print model_compare's rows of these output (or .partial) files as ratios, then exit")
    p.add_argument("--recall-job", default="", help=argparse.SUPPRESS)  # internal: one RECALL_JOBS run
    a = p.parse_args()
    global INTERPRET, SMOKE, COMPARE_ROWS, COMPILE_WORKERS, COMPILE_LIMIT, PROGRESS_PATH
    INTERPRET = SMOKE = a.smoke
    COMPARE_ROWS = a.rows
    if a.compile_workers < 1:
        p.error(f"--compile-workers must be >= 1, got {a.compile_workers}")
    COMPILE_WORKERS = a.compile_workers
    if a.compile_limit < 0:
        p.error(f"--compile-limit must be >= 0, got {a.compile_limit}")
    COMPILE_LIMIT = a.compile_limit
    PROGRESS_PATH = os.path.splitext(a.out)[0] + ".partial.json"
    if a.cache_dir:
        jax.config.update("jax_compilation_cache_dir", a.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if a.summarize:
        sections = []
        for path in a.summarize:
            try:
                with open(path) as f:
                    res = json.load(f)
            except (OSError, ValueError) as e:
                print(f"gpu_check.py: {path}: {e}", file=sys.stderr)
                return 2
            sections.append(res.get("model_compare", res) if isinstance(res, dict) else {})
        print("\n".join(compare_summary(sections)))
        return 0
    if a.recall_job:
        recall_job(a.recall_job)
        return 0
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    names = [s for s in a.only.split(",") if s] or list(SECTIONS)
    results: dict = {}
    t_start = time.perf_counter()
    for name in names:
        if time.perf_counter() - t_start > a.deadline:
            results[name] = {"skipped": "deadline"}
            continue
        t0 = time.perf_counter()
        try:
            results[name] = SECTIONS[name]()
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}"[:2000],
                             "traceback": traceback.format_exc()[-3000:]}
        results[name + "_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"== {name} ({results[name + '_seconds']} s) {json.dumps(results[name], default=str)}",
              flush=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    rc = main()
    if ABANDONED_COMPILES:  # a given-up XLA compile cannot be stopped; the results are written, so do not wait
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
