"""The safetensors reader/writer and the flat (unstacked) parameter names, without torch."""

import json
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from memlm import sharding
from memlm.config import from_dict
from memlm.convert import flat as flat_lib
from memlm.convert import safetensors_io as st
from memlm.errors import UserError
from memlm.models.lm import build_model

pytestmark = pytest.mark.unit


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a.f32": rng.normal(size=(3, 5)).astype(np.float32),
        "b.bf16": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
        "c.i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "d.scalar": np.array(2.5, np.float64),
        "e.empty": np.zeros((0, 4), np.float16),
    }


def test_write_read_round_trip(tmp_path):
    t = _tensors()
    path = str(tmp_path / "x.safetensors")
    st.write(path, t, {"k": "v"})
    back, meta = st.read(path)
    assert meta == {"k": "v"}
    assert sorted(back) == sorted(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and back[k].shape == t[k].shape, k
        assert back[k].tobytes() == t[k].tobytes(), k


def test_byte_layout_by_hand(tmp_path):
    """The header is what the format spec says: u64 length, JSON, offsets relative to the data start."""
    path = str(tmp_path / "x.safetensors")
    st.write(path, {"w": np.array([1.0, 2.0], np.float32)})
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert n % 8 == 0
    assert header == {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert np.frombuffer(raw[8 + n :], np.float32).tolist() == [1.0, 2.0]


def test_interoperates_with_the_safetensors_package(tmp_path):
    from safetensors.numpy import load_file, save_file

    t = {k: v for k, v in _tensors().items() if v.dtype != ml_dtypes.bfloat16}
    ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
    st.write(ours, t)
    save_file(t, theirs, metadata={"format": "pt"})
    for path in (ours, theirs):
        a = load_file(path) if path == ours else st.read(path)[0]
        for k in t:
            np.testing.assert_array_equal(a[k], t[k])
    assert st.read(theirs)[1] == {"format": "pt"}


@pytest.mark.parametrize("damage", ["truncate", "short", "header_json", "huge_header", "bad_dtype"])
def test_malformed_files_are_user_errors(tmp_path, damage):
    path = tmp_path / "x.safetensors"
    st.write(str(path), {"w": np.ones((4, 4), np.float32)})
    raw = path.read_bytes()
    if damage == "truncate":
        raw = raw[:-10]
    elif damage == "short":
        raw = raw[:5]
    elif damage == "header_json":
        raw = raw[:8] + b"{" * (len(raw) - 8)
    elif damage == "huge_header":
        raw = struct.pack("<Q", 1 << 40) + raw[8:]
    else:
        raw = raw.replace(b'"F32"', b'"F99"')
    path.write_bytes(raw)
    with pytest.raises(UserError, match="x.safetensors"):
        st.read(str(path))


def _model_state(**model):
    cfg = from_dict({"model": {"vocab_size": 259, "d_model": 16, "n_layers": 3, "n_heads": 2, "d_ff": 32,
                               "max_seq_len": 64, **model}, "data": {"segment_len": 16}})
    with sharding.activate(sharding.make_mesh(1, 1, 1, jax.devices()[:1])):
        return nnx.state(build_model(cfg.model, nnx.Rngs(0)))


@pytest.mark.parametrize("model", [{}, {"kind": "rmt", "arch": "gpt2", "tie_embeddings": True}])
def test_flat_names_unstack_layers_and_round_trip(model):
    state = _model_state(**model)
    flat = flat_lib.to_flat(state)
    wq = np.asarray(state["decoder"]["blocks"]["attn"]["wq"]["kernel"][...])
    for i in range(3):  # layer i of the stacked kernel is its own tensor
        np.testing.assert_array_equal(flat[f"decoder.blocks.{i}.attn.wq.kernel"], wq[i])
    assert "decoder.blocks.attn.wq.kernel" not in flat
    assert flat["decoder.embedding"].shape == (384, 16)
    if model:
        assert flat["mem_init"].shape == (16, 16)
        assert flat["decoder.blocks.2.attn.wq.bias"].shape == (16,)
        assert flat["decoder.pos_embedding"].shape == (64, 16)
    n_stacked = sum(e.stacked for e in flat_lib.layout(state))
    n_flat = sum(e.shape[0] if e.stacked else 1 for e in flat_lib.layout(state))
    assert len(flat) == n_flat and n_stacked > 0
    back = flat_lib.from_flat(flat, state, "test")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flat_errors_name_the_tensor():
    state = _model_state()
    flat = flat_lib.to_flat(state)
    missing = dict(flat)
    del missing["decoder.blocks.1.mlp.w3.kernel"]
    with pytest.raises(UserError, match=r"src: missing tensor decoder\.blocks\.1\.mlp\.w3\.kernel"):
        flat_lib.from_flat(missing, state, "src")
    bad = dict(flat)
    bad["decoder.final_norm.scale"] = np.ones(17, np.float32)
    with pytest.raises(UserError, match=r"decoder\.final_norm\.scale has shape \[17\].*\[16\]"):
        flat_lib.from_flat(bad, state, "src")
    extra = dict(flat)
    extra["decoder.blocks.3.attn.wq.kernel"] = flat["decoder.blocks.0.attn.wq.kernel"]
    with pytest.raises(UserError, match=r"unexpected tensor decoder\.blocks\.3\.attn\.wq\.kernel"):
        flat_lib.from_flat(extra, state, "src")


def test_dtype_conversion():
    state = _model_state()
    flat = flat_lib.to_flat(state, ml_dtypes.bfloat16)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in flat.values())
    back = flat_lib.from_flat(flat, state, "src")  # cast back to the float32 parameters
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b.astype(ml_dtypes.bfloat16).astype(np.float32))
        assert np.max(np.abs(a - b)) <= np.max(np.abs(b)) * 2**-8
