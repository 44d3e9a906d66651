"""Checkpoints restore onto other meshes with identical values; mismatched targets give a UserError."""

import jax
import numpy as np
import pytest

from memlm import sharding
from memlm.checkpoint import Checkpointer, param_shapes
from memlm.errors import UserError
from memlm.train import setup as setup_lib
from tests.core.helpers import tiny_config

pytestmark = pytest.mark.sharding


def _setup(cfg, shape):
    n = int(np.prod(shape))
    return setup_lib.build_setup(cfg, sharding.make_mesh(*shape, devices=jax.devices()[:n]))


def test_restore_8_to_4_and_1(tmp_path):
    cfg = tiny_config()
    s8 = _setup(cfg, (2, 2, 2))
    params = setup_lib.init_params(s8, 3)
    opt = setup_lib.init_opt_state(s8, params)
    # make the optimizer state non-trivial
    opt = jax.tree.map(lambda x: x + 0.5 if x.dtype == np.float32 else x, opt)
    carry = setup_lib.init_carry(s8, params)
    ck = Checkpointer(str(tmp_path / "ck"), async_save=True)
    ck.save(7, params, opt, carry, {"slots": {"0": [1, 2, 3]}})
    ck.close()
    ref_p = [np.asarray(x) for x in jax.tree.leaves(params)]
    ref_o = [np.asarray(x) for x in jax.tree.leaves(opt)]
    for shape in [(1, 4, 1), (2, 1, 2), (1, 1, 1)]:
        s = _setup(cfg, shape)
        ck = Checkpointer(str(tmp_path / "ck"))
        assert ck.latest_step() == 7
        p, o, c, data = ck.restore(7, s.abstract_params, s.abstract_opt, s.abstract_carry)
        ck.close()
        assert data["data_position"] == {"slots": {"0": [1, 2, 3]}}
        for a, b in zip(jax.tree.leaves(p), ref_p):
            assert a.sharding.mesh.devices.size == int(np.prod(shape))
            np.testing.assert_array_equal(np.asarray(a), b)
        for a, b in zip(jax.tree.leaves(o), ref_o):
            np.testing.assert_array_equal(np.asarray(a), b)


def test_mismatched_model_is_a_user_error(tmp_path):
    cfg = tiny_config()
    s = _setup(cfg, (1, 1, 1))
    params = setup_lib.init_params(s, 0)
    ck = Checkpointer(str(tmp_path / "ck"), async_save=False)
    ck.save(1, params, setup_lib.init_opt_state(s, params), setup_lib.init_carry(s, params), {})
    ck.close()
    other = _setup(tiny_config(model={"d_model": 48}), (1, 1, 1))
    ck = Checkpointer(str(tmp_path / "ck"))
    with pytest.raises(UserError, match="does not match"):
        ck.restore(1, other.abstract_params, other.abstract_opt, other.abstract_carry)
    ck.close()


def test_mismatch_names_the_parameters(tmp_path):
    """restore and restore_params read the checkpoint's parameter names and shapes first: a parameter the
    checkpoint lacks (a params-only restore used to leave it unfilled and fail later), one the model lacks, and a
    shape that differs are each named in the one-line error."""
    cfg = tiny_config(model={"tie_embeddings": True})
    s = _setup(cfg, (1, 1, 1))
    params = setup_lib.init_params(s, 0)
    ck = Checkpointer(str(tmp_path / "ck"), async_save=False)
    ck.save(1, params, setup_lib.init_opt_state(s, params), setup_lib.init_carry(s, params), {})
    ck.close()
    assert not any("lm_head" in k for k in param_shapes(params))  # tied: no separate head
    untied = _setup(tiny_config(model={"tie_embeddings": False}), (1, 1, 1))
    wider = _setup(tiny_config(model={"tie_embeddings": True, "d_ff": 96}), (1, 1, 1))
    ck = Checkpointer(str(tmp_path / "ck"), async_save=False)
    try:
        with pytest.raises(UserError, match=r"1 model parameter\(s\) not in the checkpoint: decoder\.lm_head"):
            ck.restore_params(1, untied.abstract_params)
        with pytest.raises(UserError, match=r"not in the checkpoint: decoder\.lm_head"):
            ck.restore(1, untied.abstract_params, untied.abstract_opt, untied.abstract_carry)
        with pytest.raises(UserError, match=r"decoder\.blocks\.mlp\.w1\.kernel has shape \(2, 32, 64\) in the "
                                            r"checkpoint, \(2, 32, 96\) in the model \(\+2 more\)"):
            ck.restore_params(1, wider.abstract_params)
        restored = ck.restore_params(1, s.abstract_params)  # the matching model still restores
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    finally:
        ck.close()
    # the other way: the checkpoint holds a parameter the model does not have
    s2 = untied
    p2 = setup_lib.init_params(s2, 0)
    ck = Checkpointer(str(tmp_path / "ck2"), async_save=False)
    ck.save(1, p2, setup_lib.init_opt_state(s2, p2), setup_lib.init_carry(s2, p2), {})
    try:
        with pytest.raises(UserError, match=r"1 checkpoint parameter\(s\) not in the model: decoder\.lm_head"):
            ck.restore_params(1, s.abstract_params)
    finally:
        ck.close()


def test_restore_error_line_drops_the_tensorstore_repr_pointer():
    from memlm.checkpoint import _first_line

    e = Exception("Encountered error while reading array index: (slice(0, 2, 1),). See full TensorStore details: "
                  "<bound method pybind11_detail.spec of TensorStore({\n  'driver': 'zarr'})>")
    assert _first_line(e) == "Encountered error while reading array index: (slice(0, 2, 1),)."
    long = _first_line(ValueError("x" * 400))
    assert len(long) == 300 and long.endswith("...")
    assert _first_line(KeyError()) == "KeyError"
