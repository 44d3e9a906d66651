"""Checkpoints restore onto other meshes with identical values; mismatched targets give a UserError."""

import jax
import numpy as np
import pytest

from memlm import sharding
from memlm.checkpoint import Checkpointer
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
