"""scripts/gpu_check.py (the one-run GPU check) keeps working: its --smoke mode runs the same sections on CPU
with interpreted kernels and small shapes. The numbers it prints on a GPU are in BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_smoke_runs_and_kernels_agree(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--smoke",
                           "--only", "env,chunked_correct,chunked_model_shapes,landmark_correct,pkm_correct,"
                           "chunked_deep,coefficients_time",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["env"]["backend"] == "cpu"
    for section in ("landmark_correct", "pkm_correct"):
        assert "error" not in res[section], res[section]
        for shape, by_impl in res[section].items():
            for impl, r in by_impl.items():  # interpreted kernel and XLA vs the float32 reference, on CPU
                assert r["finite"] and r["out"] < 1e-5 and r["grads"] < 1e-5, (section, shape, impl, r)
    lin = res["chunked_correct"]  # the linear Triton kernel (interpreted, with inner gradient clipping) and XLA
    assert "error" not in lin and all(k.endswith("_clip8") for k in lin), lin
    assert all(r["finite"] and max(r["y"], r["W_final"], r["S_final"], r["grads"]) < 1e-5
               for row in lin.values() for r in row.values()), lin
    shapes = res["chunked_model_shapes"]
    assert shapes and all("error" not in row and not [k for k in row if k.endswith("_error")]
                          and row["triton_w4_v4_fwd_bwd_ms"] > 0
               and row["triton_w4_v4_rel_diff_vs_xla"] < 1e-5 for row in shapes.values()), shapes
    deep = res["chunked_deep"]  # the deep-memory Triton kernel (interpreted) and XLA vs the token loop
    assert "error" not in deep and all("error" not in row for row in deep.values()), deep
    correct = [row for key, row in deep.items() if key.startswith("correct_")]
    assert correct and all(r["finite"] and max(r["y"], r["state"], r["grads"]) < 1e-5
                           for row in correct for r in row.values()), correct
    assert all(row["triton_fwd_bwd_ms"] > 0 for key, row in deep.items() if key.startswith("time_"))
    coef = res["coefficients_time"]
    assert "error" not in coef and all(max(r["sequential_grad_rel_diff"], r["doubling_grad_rel_diff"]) < 1e-5
                                       for r in coef.values()), coef


def test_trace_summary_counts_stream_kernels_once(tmp_path):
    """gpu_check's profiler-trace summary on a hand-made perfetto trace: only the device's CUDA-stream rows
    count (the 'XLA Ops' row repeats the kernels), busy time is the union of overlapping kernels, and kernel
    instances are grouped by family."""
    import gzip
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    meta = [dict(ph="M", name="process_name", pid=1, args=dict(name="/device:GPU:0")),
            dict(ph="M", name="process_name", pid=2, args=dict(name="/host:CPU")),
            dict(ph="M", name="thread_name", pid=1, tid=7, args=dict(name="Stream #7")),
            dict(ph="M", name="thread_name", pid=1, tid=8, args=dict(name="Stream #8")),
            dict(ph="M", name="thread_name", pid=1, tid=9, args=dict(name="XLA Ops")),
            dict(ph="M", name="thread_name", pid=2, tid=3, args=dict(name="python"))]
    kernels = [(7, "loop_add_fusion.1", 0, 10), (7, "loop_add_fusion.22", 20, 10), (8, "gemm_3", 25, 10),
               (7, "input_reduce_fusion", 100, 40)]  # us; stream 8's gemm overlaps stream 7 by 5 us
    events = meta + [dict(ph="X", pid=1, tid=tid, name=n, ts=ts, dur=d) for tid, n, ts, d in kernels]
    events += [dict(ph="X", pid=1, tid=9, name=n, ts=ts, dur=d) for _, n, ts, d in kernels]  # the repeat row
    events += [dict(ph="X", pid=2, tid=3, name="PjitFunction", ts=0, dur=500)]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "host.trace.json.gz", "wt") as f:
        json.dump(dict(traceEvents=events), f)
    got = gpu_check.trace_summary(str(tmp_path), n_steps=2)
    assert got["rows"] == ["/device:GPU:0/Stream #7", "/device:GPU:0/Stream #8"]
    assert got["kernels_per_step"] == 2.0
    assert abs(got["kernel_ms_per_step"] - 0.035) < 1e-12  # 70 us / 2 steps
    assert abs(got["busy_ms_per_step"] - 0.0325) < 1e-12  # union: [0,10] + [20,35] + [100,140] = 65 us
    fams = {f["name"]: (f["per_step"], f["ms_per_step"]) for f in got["top_families"]}
    assert fams == {"input_reduce_fusion": (0.5, 0.02), "loop_add_fusion": (1.0, 0.01), "gemm": (0.5, 0.005)}
    assert [f["name"] for f in got["top_families"]] == ["input_reduce_fusion", "loop_add_fusion", "gemm"]


def test_model_compare_saves_each_row_as_it_finishes(tmp_path):
    """model_compare prints and saves every lowered, compiled and timed row at once (<out>.partial.json), so a
    run the device's time limit cuts still leaves what it finished (session 15's lease left nothing)."""
    out = tmp_path / "mc.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on the GPU machine
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--smoke",
                           "--only", "model_compare", "--rows", "^d512/(baseline|rmt_m0)$", "--compile-workers", "2",
                           "--cache-dir", str(tmp_path / "jax_cache"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for key in ("d512/baseline", "d512/rmt_m0"):
        assert f"model_compare: lowered {key} in " in proc.stdout
        assert f"model_compare: compiled {key} at " in proc.stdout
    partial = json.loads((tmp_path / "mc.partial.json").read_text())
    assert set(partial["compile_seconds"]) == {"d512/baseline", "d512/rmt_m0"}
    assert partial["d512/baseline"]["time_per_token_vs_segment_local"] == 1.0
    assert partial["d512/rmt_m0"]["step_ms"] > 0
    assert json.loads(out.read_text())["model_compare"] == partial
    assert len(os.listdir(tmp_path / "jax_cache")) >= 2  # both compiled steps, for a later run to load
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--compile-workers", "0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "--compile-workers must be >= 1" in bad.stderr


def test_compile_limit_times_the_rows_that_compiled():
    """--compile-limit: a row still compiling after the limit is recorded as not compiled and dropped, the rows
    that did compile are kept for timing, and the call returns at the limit instead of waiting for the slow one."""
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", os.path.join(ROOT, "scripts", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    release = threading.Event()

    class FakeBench:
        def __init__(self, blocks: bool):
            self.blocks, self.compile_s = blocks, None

        def compile(self):
            if self.blocks:
                release.wait(60)
            self.compile_s = 0.5

    try:
        benches, out = {"w/fast": FakeBench(False), "w/slow": FakeBench(True)}, {}
        t0 = time.perf_counter()
        gpu_check._compile_all(benches, out, workers=2, limit=1.0)
        waited = time.perf_counter() - t0
    finally:
        release.set()
    assert 1.0 <= waited < 30, waited
    assert list(benches) == ["w/fast"]
    assert out["compile_seconds"] == {"w/fast": 0.5}
    assert out["w/slow"] == {"error": "compile not finished after 1 s (--compile-limit)"}
    assert out["compiles_left_running"] == ["w/slow"] and gpu_check.ABANDONED_COMPILES
    benches, out = {"w/a": FakeBench(False), "w/b": FakeBench(False)}, {}  # no limit: every row compiles
    gpu_check.ABANDONED_COMPILES = False
    gpu_check._compile_all(benches, out, workers=2)
    assert sorted(benches) == ["w/a", "w/b"] and not gpu_check.ABANDONED_COMPILES


def test_compare_summary_states_each_row_against_its_own_runs_baselines(tmp_path):
    """--summarize: time per token = baseline tokens/s over the row's; each file's rows use its own baselines."""
    run1 = {"model_compare": {
        "d512/baseline": {"step_ms": 10.0, "tokens_per_sec": 1000.0, "time_per_token_vs_segment_local": 1.0},
        "d512/baseline_full_attention": {"step_ms": 25.0, "tokens_per_sec": 400.0,
                                         "time_per_token_vs_segment_local": 2.5},
        "d512/titans_mag": {"step_ms": 40.0, "tokens_per_sec": 250.0, "time_per_token_vs_segment_local": 4.0},
        "d512/titans_mag_slow": {"error": "compile not finished after 9 s (--compile-limit)"}}}
    run2 = {"d512_4k/baseline": {"step_ms": 5.0, "tokens_per_sec": 2000.0, "time_per_token_vs_segment_local": 1.0},
            "d512_4k/titans_mag": {"step_ms": 9.0, "tokens_per_sec": 1000.0, "time_per_token_vs_segment_local": 2.0}}
    (tmp_path / "a.json").write_text(json.dumps(run1))
    (tmp_path / "b.partial.json").write_text(json.dumps(run2))  # a partial file holds the section itself
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--summarize",
                           str(tmp_path / "a.json"), str(tmp_path / "b.partial.json")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "d512/baseline: 10.0 ms, vs segment-local 1.00x, vs full attention 0.40x",
        "d512/baseline_full_attention: 25.0 ms, vs segment-local 2.50x, vs full attention 1.00x",
        "d512/titans_mag: 40.0 ms, vs segment-local 4.00x, vs full attention 1.60x",
        "d512/titans_mag_slow: compile not finished after 9 s (--compile-limit)",
        "d512_4k/baseline: 5.0 ms, vs segment-local 1.00x, vs full attention -",
        "d512_4k/titans_mag: 9.0 ms, vs segment-local 2.00x, vs full attention -"]
    (tmp_path / "bad.json").write_text("{not json")
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--summarize",
                          str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and str(tmp_path / "bad.json") in bad.stderr and "Traceback" not in bad.stderr
