"""Landmark retrieval with the K/V cache in host memory (model.landmark.offload_kv).

Reference: the on-device path (one jitted segment_logits, itself checked against the training forward and
a float64 loop in tests/memory/test_landmark.py and tests/pallas_kernels). The offload path must choose the
same blocks (exactly) and give the same logits up to float32 rounding (2e-5 absolute on O(1) logits, the
tolerance of test_landmark.py), through FIFO eviction, a fresh carry and the re-use of an old carry.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm import sharding
from memlm.cli import main as cli_main
from memlm.config import from_dict
from memlm.memory.landmark import HostKV
from tests.memory.common import SMALL, make

pytestmark = pytest.mark.integration

V = SMALL["vocab_size"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# b = 4, 8-token chunks = 2 blocks per chunk, a cache of 4 blocks: evictions from the third chunk on
LM = {"block_size": 4, "top_k": 2, "cache_blocks": 4}


def _pair(mode: str):
    """(cfg, on-device model, offload model with the same parameters)."""
    cfg, dev = make("landmark", landmark={**LM, "retrieval_mode": mode})
    cfg_off, off = make("landmark", landmark={**LM, "retrieval_mode": mode, "offload_kv": True})
    nnx.update(off, nnx.state(dev))
    return cfg, cfg_off, dev, off


def _device_step(model):
    gd, st = nnx.split(model)
    f = jax.jit(lambda s, c, t: nnx.merge(gd, s).segment_logits_and_indices(c, t))
    return lambda c, t: f(st, c, t)


def _tokens(seed: int, n_chunks: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(3, V, size=(2, 8 * n_chunks)), jnp.int32)


def _check_step(dev_step, off, cd, co, t, where):
    ld, cd, idx_d = dev_step(cd, t)
    lo, co, idx_o = off.stream_segment(co, t, return_indices=True)
    np.testing.assert_array_equal(np.asarray(idx_o), np.asarray(idx_d), err_msg=f"{where}: retrieved blocks")
    np.testing.assert_allclose(np.asarray(lo), np.asarray(ld), atol=2e-5, err_msg=f"{where}: logits")
    return cd, co


def _check_cache(cd, co, cfg):
    """The host FIFO holds exactly the on-device cache; the device part is only the landmark keys."""
    c, lc = cfg.model, cfg.model.landmark
    nb, L = lc.cache_blocks, lc.block_size + 1
    assert co["landmark_k"].shape == (c.n_layers, 2, c.kv_heads, nb, c.hd)
    assert cd["k"].shape == (c.n_layers, 2, c.kv_heads, nb, L, c.hd)
    device_leaves = {k for k, v in co.items() if isinstance(v, jax.Array)}
    assert device_leaves == {"num_blocks", "landmark_k"}, device_leaves
    host = co["host_kv"]
    assert isinstance(host, HostKV) and all(isinstance(a, np.ndarray) for a in host.k + host.v)
    np.testing.assert_array_equal(co["num_blocks"], cd["num_blocks"])
    every = np.broadcast_to(np.arange(nb), (2, nb))
    for layer in range(c.n_layers):  # layer 0 bit for bit; later layers see the float rounding of h
        hk, hv = host.gather(layer, every)
        np.testing.assert_array_equal(co["landmark_k"][layer], hk[:, :, :, L - 1])  # the same blocks
        check = np.testing.assert_array_equal if layer == 0 else np.testing.assert_allclose
        check(hk, cd["k"][layer], **({} if layer == 0 else {"atol": 2e-5}))
        check(hv, cd["v"][layer], **({} if layer == 0 else {"atol": 2e-5}))
    assert nb <= sum(a.shape[3] for a in host.k) < nb + 2  # evicted chunks are dropped (2 blocks per chunk)


@pytest.mark.parametrize("mode", ["per_token_and_head", "max_over_heads", "max_over_tokens"])
def test_offload_equals_on_device_streaming(mode):
    cfg, cfg_off, dev, off = _pair(mode)
    dev_step = _device_step(dev)
    toks = _tokens(0, 6)
    cd, co = dev.init_carry(2), off.init_carry(2)
    saved = None
    for s in range(6):  # chunks 0-1 fill the cache, 2-5 evict the oldest blocks
        cd, co = _check_step(dev_step, off, cd, co, toks[:, 8 * s : 8 * s + 8], f"{mode} chunk {s}")
        if s == 2:
            saved = (cd, co)
    assert int(co["num_blocks"][0]) == 4 and co["host_kv"].total == 12
    _check_cache(cd, co, cfg)
    # an old carry is still valid (LoadedModel re-runs partial chunks from one and drops the result)
    other = _tokens(1, 3)
    _check_step(dev_step, off, *saved, other[:, :8], f"{mode} from the chunk-2 carry")
    # a fresh stream (new document) sees nothing of the previous one
    cd, co = dev.init_carry(2), off.init_carry(2)
    for s in range(3):
        cd, co = _check_step(dev_step, off, cd, co, other[:, 8 * s : 8 * s + 8], f"{mode} reset, chunk {s}")
    assert co["host_kv"].total == 6


def test_loaded_model_streams_from_host_memory():
    from memlm.api import LoadedModel
    from memlm.train import setup as setup_lib

    cfg, cfg_off, dev, off = _pair("per_token_and_head")
    mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])

    def loaded(c, model):
        return LoadedModel(c, nnx.state(model), setup_lib.build_setup(c, mesh, batch_size=1), 0)

    lm_dev, lm_off = loaded(cfg, dev), loaded(cfg_off, off)
    assert lm_dev._host_stream is None and lm_off._host_stream is not None
    _, carry = lm_off.step_segment(lm_off.init_carry(1), np.arange(3, 11)[None], 0)
    assert "host_kv" in carry and "k" not in carry  # the hook, not the jitted segment_logits, ran
    prompt = np.random.default_rng(2).integers(3, V, size=45).tolist()  # 5 chunks + 5: past the cache
    np.testing.assert_allclose(lm_off.logits(np.asarray([prompt])), lm_dev.logits(np.asarray([prompt])), atol=2e-5)
    assert lm_off.generate(prompt, max_new_tokens=5, eos_id=-1) == lm_dev.generate(prompt, 5, eos_id=-1)


def test_config_and_eval_lm_on_an_offload_run(tmp_path, capsys):
    cfg = from_dict({"model": {"kind": "landmark", "landmark": {"offload_kv": True}}, "data": {"segment_len": 100}})
    assert cfg.model.landmark.offload_kv
    run = str(tmp_path / "run")
    tiny = ["data.source=synthetic", "data.segment_len=32", "data.n_segments=2", "model.d_model=32",
            "model.d_ff=64", "model.landmark.cache_blocks=8", "train.eval_every=0", "train.progress=false",
            "train.batch_size=8", "train.log_every=1"]
    # training ignores offload_kv (it is not retrieval); the run's config.yaml keeps it for inference
    code = cli_main(["train", os.path.join(ROOT, "configs/tiny/landmark.yaml"), *tiny, "train.steps=1",
                     "model.landmark.offload_kv=true", f"run.dir={run}"])
    assert code == 0, capsys.readouterr().err[-2000:]
    capsys.readouterr()
    assert cli_main(["eval", "lm", "--run", run, "--max-batches", "1"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out[out.index("{") :])
    assert np.isfinite(res["token_perplexity"]) and res["token_perplexity"] > 1

    import memlm

    lm = memlm.load(run)
    assert lm.config.model.landmark.offload_kv and lm._host_stream is not None
    logits = lm.logits(np.random.default_rng(3).integers(3, V, size=(1, 100)))  # 4 chunks, one partial
    assert logits.shape == (1, 100, V) and np.isfinite(logits).all()
