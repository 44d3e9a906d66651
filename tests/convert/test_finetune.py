"""An imported GPT-2 backbone wrapped with RMT: `memlm import hf` -> `memlm train` (one step) -> `memlm eval lm`."""

import json

import numpy as np
import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("transformers")

from memlm.convert import runs  # noqa: E402
from tests.convert.common import FAST, run_params, tiny_gpt2  # noqa: E402
from tests.core.cli_utils import run_memlm  # noqa: E402

pytestmark = pytest.mark.integration


def test_rmt_on_an_imported_gpt2_fine_tunes_and_evaluates(tmp_path):
    src = tiny_gpt2(str(tmp_path / "hf"))
    run = tmp_path / "run"
    r = run_memlm("import", "hf", src, "--out", str(run), *FAST, "model.kind=rmt", "model.rmt.num_mem_tokens=4",
                  "train.steps=1", "train.warmup_steps=0", "train.lr=1e-2", "train.batch_size=8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["model.kind"] == "rmt"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["kind"] == "rmt" and cfg["model"]["arch"] == "gpt2"
    assert cfg["run"]["dir"] == str(run)
    imported = run_params(str(run))
    assert "mem_init" in imported and imported["mem_init"].shape == (4, 32)
    # M_0 ~ N(0,1) * std(word embeddings) (models.md §1(a)): the imported embedding's (0.2 here), not init_std 0.02
    ratio = imported["mem_init"].std() / imported["decoder.embedding"][:300].std()
    assert 0.7 < ratio < 1.4, ratio

    r = run_memlm("train", str(run / "config.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 0" in r.stderr
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert metrics["step"] == 1 and np.isfinite(metrics["loss"])
    tuned = run_params(str(run))
    # the step trained the imported backbone and the fresh memory
    for name in ("decoder.blocks.0.attn.wq.kernel", "decoder.pos_embedding", "mem_init"):
        assert np.abs(tuned[name] - imported[name]).max() > 1e-4, name

    r = run_memlm("eval", "lm", "--run", str(run), "--max-batches", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["step"] == 1 and np.isfinite(result["token_nll"])


def test_import_writes_the_state_the_trainer_restores(tmp_path):
    """checkpoints/0 holds params, a fresh optimizer state, the carry and a fresh data position (no data is
    read at import)."""
    src = tiny_gpt2(str(tmp_path / "hf"))
    run = str(tmp_path / "run")
    runs.import_hf(src, run, [*FAST, "model.kind=rmt", "model.rmt.num_mem_tokens=2"])
    from memlm.checkpoint import Checkpointer
    from memlm.config import read_run_config

    cfg = read_run_config(run)
    setup = runs._setup(cfg)
    ck = Checkpointer(f"{run}/checkpoints", async_save=False)
    assert ck.all_steps() == [0]
    params, opt, carry, data = ck.restore(0, setup.abstract_params, setup.abstract_opt, setup.abstract_carry)
    ck.close()
    assert carry["memory"].shape == (2, 2, 32)
    np.testing.assert_array_equal(np.asarray(carry["memory"][1]), np.asarray(params["mem_init"][...]))
    mu = opt[1][0].mu  # adamw's first moment: zeros
    assert all(float(np.abs(np.asarray(x)).max()) == 0.0 for x in __import__("jax").tree.leaves(mu))
    assert data["data_position"] == {"fresh": True}  # the trainer starts the data anew (and checks data.* then)
