"""memlm -> safetensors -> memlm and memlm -> hf -> memlm give identical parameters (memory included); a
params-only export restores onto another mesh; exports never overwrite without --force."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from memlm import sharding
from memlm.checkpoint import load_params_only
from memlm.convert import flat as flat_lib
from memlm.convert import runs
from memlm.convert import safetensors_io as st
from memlm.errors import UserError
from memlm.train import setup as setup_lib
from tests.convert.common import make_run, run_params
from tests.core.cli_utils import run_memlm, snapshot

pytestmark = pytest.mark.integration

RMT = {"kind": "rmt", "vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 48,
       "max_seq_len": 64, "dtype": "float32", "remat": "none", "rmt": {"num_mem_tokens": 3}}


@pytest.fixture(scope="module")
def rmt_run(tmp_path_factory):
    return make_run(str(tmp_path_factory.mktemp("native") / "run"), RMT, seed=5)


def _same(a: dict, b: dict, skip_padding: int | None = None) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = a[k], b[k]
        if skip_padding is not None and k in ("decoder.embedding", "decoder.lm_head.kernel"):
            # vocab padding rows/columns are never used; an HF export drops them and an import zeroes them
            axis = 0 if k == "decoder.embedding" else 1
            assert not np.any(np.take(y, range(skip_padding, y.shape[axis]), axis=axis)), k
            x, y = np.take(x, range(skip_padding), axis=axis), np.take(y, range(skip_padding), axis=axis)
        np.testing.assert_array_equal(x, y, err_msg=k)


def test_safetensors_round_trip(rmt_run, tmp_path):
    path = str(tmp_path / "model.safetensors")
    runs.export_run(rmt_run, "safetensors", path)
    tensors, meta = st.read(path)
    assert meta["memlm.layers"] == "unstacked" and "kind: rmt" in meta["memlm.config"]
    assert tensors["decoder.blocks.1.attn.wk.kernel"].shape == (32, 16)  # one tensor per layer
    assert tensors["mem_init"].shape == (3, 32)
    back = str(tmp_path / "back")
    runs.import_safetensors(path, back)
    _same(run_params(rmt_run), run_params(back))

    bf = str(tmp_path / "bf16.safetensors")
    runs.export_run(rmt_run, "safetensors", bf, dtype="bfloat16")
    tb, _ = st.read(bf)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in tb.values())
    np.testing.assert_array_equal(tb["mem_init"], tensors["mem_init"].astype(ml_dtypes.bfloat16))


def test_hf_round_trip_keeps_the_memory(rmt_run, tmp_path):
    out = str(tmp_path / "hf")
    runs.export_run(rmt_run, "hf", out)
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "memory.safetensors", "memlm.yaml", "README.md"} <= names
    hf = json.load(open(os.path.join(out, "config.json")))
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["num_key_value_heads"] == 2
    assert hf["vocab_size"] == 300
    backbone, meta = st.read(os.path.join(out, "model.safetensors"))
    assert meta == {"format": "pt"}
    assert backbone["model.embed_tokens.weight"].shape == (300, 32)  # padding rows dropped
    assert not any(k.startswith("mem") for k in backbone)
    memory, _ = st.read(os.path.join(out, "memory.safetensors"))
    assert sorted(memory) == ["mem_init"]
    assert "memory.safetensors" in open(os.path.join(out, "README.md")).read()

    back = str(tmp_path / "back")
    runs.import_hf(out, back)  # memlm.yaml + memory.safetensors: the same rmt model
    _same(run_params(rmt_run), run_params(back), skip_padding=300)

    # another kind on the same backbone: the memory comes fresh, the backbone is the same
    base = str(tmp_path / "as_baseline")
    runs.import_hf(out, base, ["model.kind=baseline"])
    p, q = run_params(rmt_run), run_params(base)
    assert "mem_init" not in q
    np.testing.assert_array_equal(p["decoder.blocks.1.mlp.w2.kernel"], q["decoder.blocks.1.mlp.w2.kernel"])


def test_params_export_restores_onto_another_mesh(rmt_run, tmp_path):
    out = str(tmp_path / "params")
    runs.export_run(rmt_run, "params", out)
    cfg = runs.config_lib.read_run_config(rmt_run)
    ref = run_params(rmt_run)
    for shape in [(2, 2, 2), (1, 4, 2)]:
        mesh = sharding.make_mesh(*shape, devices=jax.devices()[:8])
        setup = setup_lib.build_setup(cfg, mesh)
        params = load_params_only(out, setup.abstract_params)
        wq = params["decoder"]["blocks"]["attn"]["wq"]["kernel"][...]
        assert wq.sharding.mesh.devices.size == 8 and wq.sharding.spec == setup.param_sh["decoder"]["blocks"][
            "attn"]["wq"]["kernel"].get_value().spec
        _same(ref, flat_lib.to_flat(params))


def test_export_refuses_to_overwrite(rmt_run, tmp_path):
    out = tmp_path / "exists.safetensors"
    out.write_text("precious")
    r = run_memlm("export", "--run", rmt_run, "--format", "safetensors", "--out", str(out))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("memlm: error:")]
    assert len(lines) == 1 and "already exists" in lines[0] and "--force" in lines[0], r.stderr[-2000:]
    assert out.read_text() == "precious"
    # --force replaces a previous safetensors export, not a file of the user's (session 17's README audit)
    r = run_memlm("export", "--run", rmt_run, "--format", "safetensors", "--out", str(out), "--force")
    assert r.returncode == 2 and "a file that is not a previous export" in r.stderr, r.stderr[-2000:]
    assert out.read_text() == "precious"
    prev = tmp_path / "prev.safetensors"
    runs.export_run(rmt_run, "safetensors", str(prev))
    runs.export_run(rmt_run, "safetensors", str(prev), force=True)
    assert st.read(str(prev))[0]["mem_init"].shape == (3, 32)
    assert sorted(os.listdir(tmp_path)) == ["exists.safetensors", "prev.safetensors"]  # no temporary left behind
    # missing parent directories are made, as `memlm train` makes run.dir's
    runs.export_run(rmt_run, "safetensors", str(tmp_path / "a" / "b" / "new.safetensors"))
    assert (tmp_path / "a" / "b" / "new.safetensors").is_file()
    (tmp_path / "a" / "b").joinpath("new.safetensors").unlink()
    (tmp_path / "a" / "b").rmdir()
    (tmp_path / "a").rmdir()
    # a directory destination too, and bad steps
    d = tmp_path / "dir"
    d.mkdir()
    (d / "keep").write_text("x")
    before = snapshot(str(d))
    with pytest.raises(UserError, match="already exists"):
        runs.export_run(rmt_run, "hf", str(d))
    with pytest.raises(UserError, match="no checkpoint at step 7"):
        runs.export_run(rmt_run, "hf", str(tmp_path / "new"), step=7)
    with pytest.raises(UserError, match="not a memlm run directory"):
        runs.export_run(str(tmp_path), "hf", str(tmp_path / "new"))
    assert snapshot(str(d)) == before and not (tmp_path / "new").exists()
    # --force replaces a previous export of the same kind, never a directory of the user's, nor / (session 16)
    for fmt in ("hf", "params", "safetensors"):
        with pytest.raises(UserError, match="a directory that is not a"):
            runs.export_run(rmt_run, fmt, str(d), force=True)
    assert snapshot(str(d)) == before
    with pytest.raises(UserError, match="would overwrite its own source"):
        runs.export_run(rmt_run, "safetensors", "/", force=True)
    for fmt in ("hf", "params"):
        runs.export_run(rmt_run, fmt, str(tmp_path / fmt))
        runs.export_run(rmt_run, fmt, str(tmp_path / fmt), force=True)


def test_hub_layouts_import(rmt_run, tmp_path):
    """GPT-2 names without the `transformer.` prefix plus causal-mask buffers (the original hub files), and a
    Llama split into shards with model.safetensors.index.json, import to the same parameters."""
    gpt2 = {**RMT, "kind": "baseline", "arch": "gpt2", "n_kv_heads": 0, "tie_embeddings": True, "rmt": None}
    run = make_run(str(tmp_path / "gpt2run"), gpt2, seed=2)
    hf = tmp_path / "gpt2hf"
    runs.export_run(run, "hf", str(hf))
    t, meta = st.read(str(hf / "model.safetensors"))
    hub = {k.removeprefix("transformer."): np.array(v) for k, v in t.items()}
    hub["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    hub["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    st.write(str(hf / "model.safetensors"), hub, meta)
    back = str(tmp_path / "gpt2back")
    runs.import_hf(str(hf), back)
    _same(run_params(run), run_params(back), skip_padding=300)

    hf = tmp_path / "llamahf"
    runs.export_run(rmt_run, "hf", str(hf))
    t, meta = st.read(str(hf / "model.safetensors"))
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, ks in shards.items():
        st.write(str(hf / shard), {k: np.array(t[k]) for k in ks}, meta)
    os.remove(hf / "model.safetensors")
    index = {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    back = str(tmp_path / "llamaback")
    runs.import_hf(str(hf), back)
    _same(run_params(rmt_run), run_params(back), skip_padding=300)
