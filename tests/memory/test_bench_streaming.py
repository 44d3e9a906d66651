"""scripts/bench_streaming.py streams a kind whose carry gains entries after the first segment (landmark's K/V
cache: the compiled step used to be built from the initial carry and refused the second one)."""

import importlib.util
import math
import os

from tests.core.cli_utils import ROOT


def test_streams_landmark():
    path = os.path.join(ROOT, "scripts", "bench_streaming.py")
    spec = importlib.util.spec_from_file_location("bench_streaming", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.stream(os.path.join(ROOT, "configs", "tiny", "landmark.yaml"),
                       ["model.d_model=32", "model.d_ff=64", "model.n_layers=1", "model.dtype=float32"], 256, 1, 0)
    assert out["kind"] == "landmark" and out["segments"] == 2 and out["tokens"] == 256
    assert math.isfinite(out["ms_per_segment"]) and out["step_temp_mib"] > 0
