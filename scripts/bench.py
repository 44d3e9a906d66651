#!/usr/bin/env python
"""Benchmarks: train-step throughput and memory for configs, plus the kernel benchmarks.

    python scripts/bench.py train configs/tiny/baseline.yaml --sizes 128x2,256x2 --steps 10 --out bench_out/base.json
    python scripts/bench.py compare configs/tiny/baseline.yaml configs/tiny/rmt.yaml --sizes 128x4
    python scripts/bench.py kernel chunked_memory|landmark_attention|pkm_lookup [--out F]

`train` times the jitted train step on synthetic batches (compile time reported separately, step time is the
median of timed steps after 2 warm-up steps) and reads per-device memory from compiled.memory_analysis().
`compare` runs several configs in ONE process at the same sizes (all compiled first, then timed round-robin for
--rounds rounds) and reports each as a ratio against the first, because these machines are noisy.
Sizes are SEGMENT_LENxN_SEGMENTS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memlm.errors import OneLineArgumentParser, positive_int, run_script  # noqa: E402


class _Bench:
    """One config compiled at one size, with its own state and batches; `run(k)` times k more steps."""

    def __init__(self, path: str, overrides: list[str], seg_len: int, n_seg: int, compile: bool = True):
        """Builds, lowers and (unless compile=False: call `compile()` later, e.g. in a thread pool) compiles."""
        import jax

        from memlm.config import load_config
        from memlm.data.batcher import SegmentBatcher
        from memlm.data.synthetic import SyntheticCorpus
        from memlm.sharding import mesh_from_config
        from memlm.train import setup as setup_lib

        self.path, self.overrides, self.seg_len, self.n_seg = path, overrides, seg_len, n_seg
        cfg = self.cfg = load_config(path, overrides + [f"data.segment_len={seg_len}", f"data.n_segments={n_seg}",
                                                        "data.source=synthetic", "model.max_seq_len=1048576"])
        setup = self.setup = setup_lib.build_setup(cfg, mesh_from_config(cfg.mesh))
        self.params = setup_lib.init_params(setup, 0)
        self.opt = setup_lib.init_opt_state(setup, self.params)
        self.carry = setup_lib.init_carry(setup, self.params)
        corpus = SyntheticCorpus(cfg.model.vocab_size, n_docs=256, min_len=seg_len * n_seg,
                                 max_len=4 * seg_len * n_seg)
        self.batcher = SegmentBatcher(corpus, cfg.train.batch_size, n_seg, seg_len, seed=0)
        step = setup_lib.jit_train_step(setup)
        spec = setup_lib.batch_spec(cfg)
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sh[k])
                          for k, v in spec.items()}
        with setup.activate():
            t0 = time.perf_counter()
            self.lowered = step.lower(setup.abstract_params, setup.abstract_opt, setup.abstract_carry,
                                      abstract_batch)
            self.lower_s = time.perf_counter() - t0
        self.times: list[float] = []
        self.compiled = None
        if compile:
            self.compile()

    def compile(self) -> _Bench:
        """XLA-compile the lowered step (thread-safe: the C++ compiler releases the GIL). The first timed `run`
        warms up first."""
        t0 = time.perf_counter()
        self.compiled, self.lowered = self.lowered.compile(), None
        self.compile_s = time.perf_counter() - t0
        self.mem = self.compiled.memory_analysis()
        return self

    def run(self, k: int, record: bool = True) -> None:
        import jax

        from memlm import distributed

        if record and not self.times:
            self.run(2, record=False)  # warm-up before the first timed step

        with self.setup.activate():
            for _ in range(k):
                batch = distributed.to_global(self.batcher.next(), self.setup.batch_sh)
                t = time.perf_counter()
                self.params, self.opt, self.carry, self.metrics = self.compiled(
                    self.params, self.opt, self.carry, batch)
                jax.block_until_ready(self.metrics["loss"])
                if record:
                    self.times.append(time.perf_counter() - t)

    def result(self) -> dict:
        import numpy as np

        from memlm.train import setup as setup_lib

        cfg = self.cfg
        step_s = statistics.median(self.times)
        tokens = cfg.train.batch_size * self.seg_len * self.n_seg
        out = {
            "config": self.path + (":" + ";".join(self.overrides) if self.overrides else ""),
            "kind": cfg.model.kind,
            "segment_len": self.seg_len,
            "n_segments": self.n_seg,
            "batch": cfg.train.batch_size,
            "params": setup_lib.param_count(self.setup.abstract_params),
            "compile_s": round(self.compile_s, 3),
            "timed_steps": len(self.times),
            "step_s": step_s,
            "tokens_per_sec": tokens / step_s,
            "sec_per_token": step_s / tokens,
            "loss": float(np.asarray(self.metrics["loss"])),
            "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        }
        if self.mem is not None:
            out["temp_mib"] = self.mem.temp_size_in_bytes / 2**20
            out["argument_mib"] = self.mem.argument_size_in_bytes / 2**20
        return out


def _bench_config(path: str, overrides: list[str], seg_len: int, n_seg: int, steps: int) -> dict:
    b = _Bench(path, overrides, seg_len, n_seg)
    b.run(steps)
    return b.result()


def _sizes(text: str) -> list[tuple[int, int]]:
    """argparse type: 'SEGMENT_LENxN_SEGMENTS[,...]' -> [(segment_len, n_segments), ...]."""
    out = []
    for item in text.split(","):
        try:
            seg, n = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected SEGMENT_LENxN_SEGMENTS, e.g. 128x2") from None
        if seg < 1 or n < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: sizes must be >= 1")
        out.append((seg, n))
    return out


def _print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(f"{r.get(c, ''):.4g}" if isinstance(r.get(c), float) else str(r.get(c, '')))
                              for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        cells = [f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        print("  ".join(x.ljust(w) for x, w in zip(cells, widths)))


def _write(out: str | None, payload) -> None:
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {out}")


def main() -> int:
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="throughput and memory of one config at several sizes")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*")
    t.add_argument("--sizes", type=_sizes, default="128x2", help="SEGMENT_LENxN_SEGMENTS[,...]")
    t.add_argument("--steps", type=positive_int, default=10)
    t.add_argument("--out", default=None)
    c = sub.add_parser("compare", help="several configs in one process, as ratios against the first")
    c.add_argument("configs", nargs="+", help="config paths; `path:key=value;key=value` adds overrides")
    c.add_argument("--sizes", type=_sizes, default="128x2")
    c.add_argument("--steps", type=positive_int, default=10, help="timed steps per config per round")
    c.add_argument("--rounds", type=positive_int, default=1, help="round-robin rounds over the configs")
    c.add_argument("--out", default=None)
    k = sub.add_parser("kernel", help="a kernel benchmark from pallas_kernels/<op>/bench.py")
    k.add_argument("op", choices=["chunked_memory", "landmark_attention", "pkm_lookup"])
    k.add_argument("--out", default=None)
    args = p.parse_args()

    if args.cmd == "train":
        rows = [_bench_config(args.config, args.overrides, s, n, args.steps) for s, n in args.sizes]
        _print_table(rows, ["kind", "segment_len", "n_segments", "params", "compile_s", "step_s",
                            "tokens_per_sec", "temp_mib", "max_rss_gib"])
        _write(args.out, rows)
    elif args.cmd == "compare":
        rows = []
        for s, n in args.sizes:
            parts = [c.partition(":") for c in args.configs]
            specs = [(path, [o for o in ov.split(";") if o]) for path, _, ov in parts]
            benches = [_Bench(path, ov, s, n) for path, ov in specs]
            # Round-robin: every config gets `steps` timed steps per round, so slow drifts of the machine's
            # load hit all configs alike; the reported step time is the median over all rounds.
            for _ in range(args.rounds):
                for b in benches:
                    b.run(args.steps)
            base = benches[0].result()
            for b in benches:
                r = b.result()
                r["time_per_token_ratio"] = r["sec_per_token"] / base["sec_per_token"]
                r["temp_mem_ratio"] = r.get("temp_mib", 0) / max(base.get("temp_mib", 1), 1e-9)
                rows.append(r)
            del benches
        _print_table(rows, ["config", "kind", "segment_len", "n_segments", "step_s", "tokens_per_sec",
                            "time_per_token_ratio", "temp_mib", "temp_mem_ratio"])
        _write(args.out, rows)
    else:
        import importlib

        mod = importlib.import_module(f"pallas_kernels.{args.op}.bench")
        result = mod.run()
        print(json.dumps(result, indent=2, default=str))
        _write(args.out, result)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(run_script(main, "bench.py"))
