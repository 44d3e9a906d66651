"""Learning through the CLI: LM2 from scratch recalls key/value pairs one segment back (issue #3's task family).

configs/tiny/lm2_recall.yaml is configs/tiny/titans_mac_recall.yaml's task and backbone (2 segments of 16 tokens,
2 pairs in segment 0, queries in segment 1; attention is segment-local) with LM2's memory, trained as a user would
(`memlm train`, then `memlm eval recall`) and without a curriculum. A memoryless model stays near chance on this
task (the MAC-without-memory control of test_titans_recall_cli.py: 7.7%).

Measured (BENCHMARKS.md "Associative recall", session 11, 1-device processes): 99.8% / 97.4% / 97.9% after
10,000 steps with run.seed 0 / 1 / 2 (~5 min each on 2 CPU cores).
"""

import json

import pytest

from tests.core.cli_utils import run_memlm

pytestmark = pytest.mark.slow

ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}  # as the measured runs


@pytest.mark.timeout(3600)
def test_lm2_recall_from_scratch_cli_reaches_90(tmp_path):
    run_dir, out = tmp_path / "lm2", tmp_path / "recall.json"
    r = run_memlm("train", "configs/tiny/lm2_recall.yaml", f"run.dir={run_dir}", "train.progress=false",
                  timeout=3000, env=ONE_DEVICE)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_memlm("eval", "recall", "--run", str(run_dir), "--out", str(out), timeout=600, env=ONE_DEVICE)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    print(f"\nCLI LM2 recall from scratch: {got}")
    assert got["model"] == "lm2" and got["n_answers"] == 512 * 2
    assert got["accuracy"] >= 0.90, got
