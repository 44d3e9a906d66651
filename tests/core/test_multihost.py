"""Two processes x 4 CPU devices on 127.0.0.1 train the same losses as one process with 8 devices."""

import json
import os
import subprocess

import numpy as np
import portpicker
import pytest

from tests.core.cli_utils import ROOT, memlm_cmd, run_memlm

pytestmark = pytest.mark.sharding

ARGS = [
    "configs/tiny/baseline.yaml", "data.source=synthetic", "data.segment_len=32", "data.n_segments=2",
    "model.d_model=32", "model.d_ff=64", "train.steps=3", "train.log_every=1", "train.eval_every=0",
    "train.checkpoint_every=2", "train.progress=false", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
]


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(x)["loss"] for x in f]


def test_two_processes_match_one(tmp_path):
    single = str(tmp_path / "single")
    r = run_memlm("train", *ARGS, f"run.dir={single}")
    assert r.returncode == 0, r.stderr[-2000:]

    multi = str(tmp_path / "multi")
    port = portpicker.pick_unused_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [
        subprocess.Popen(
            memlm_cmd("train", *ARGS, f"run.dir={multi}", "distributed.enabled=true",
                      f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                      f"distributed.process_id={i}", "distributed.local_device_count=4",
                      "distributed.initialization_timeout=60"),
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    a, b = _losses(single), _losses(multi)
    assert len(a) == len(b) == 3
    np.testing.assert_allclose(b, a, rtol=1e-6)
    # each process saved the data position of its own batch slots
    states = sorted(os.listdir(os.path.join(multi, "data_state", "3")))
    assert states == ["process_0.json", "process_1.json"]
    slots = [set(json.load(open(os.path.join(multi, "data_state", "3", s)))["slots"]) for s in states]
    assert slots[0] == {"0", "1", "2", "3"} and slots[1] == {"4", "5", "6", "7"}
