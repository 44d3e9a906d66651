"""scripts/gpu_check.py (the one-run GPU check) keeps working: its --smoke mode runs the same sections on CPU
with interpreted kernels and small shapes. The numbers it prints on a GPU are in BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    assert shapes and all("error" not in row and row["triton_w4_v4_fwd_bwd_ms"] > 0
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
