"""One train step gives the same loss on every mesh; params are sharded as the rules table says."""

import jax
import numpy as np
import pytest

from memlm import distributed, sharding
from memlm.train import setup as setup_lib
from tests.core.helpers import random_batch, tiny_config

pytestmark = pytest.mark.sharding

MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]


def _two_steps(cfg, mesh_shape):
    n = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:n])
    setup = setup_lib.build_setup(cfg, mesh)
    params = setup_lib.init_params(setup, 0)
    opt = setup_lib.init_opt_state(setup, params)
    carry = setup_lib.init_carry(setup, params)
    step = setup_lib.jit_train_step(setup)
    losses = []
    with setup.activate():
        for i in range(2):
            batch = distributed.to_global(random_batch(cfg, i), setup.batch_sh)
            params, opt, carry, m = step(params, opt, carry, batch)
            losses.append(float(m["loss"]))
    return losses, params, setup


@pytest.mark.parametrize("segment_local", [False, True])
def test_same_loss_on_every_mesh(segment_local):
    cfg = tiny_config(model={"segment_local": segment_local})
    results = {shape: _two_steps(cfg, shape)[0] for shape in MESHES}
    ref = np.array(results[(1, 1, 1)])
    assert np.all(np.isfinite(ref)) and ref[0] > 1.0
    for shape, losses in results.items():
        # float32 tolerance: reductions are reordered across shards
        np.testing.assert_allclose(losses, ref, rtol=2e-6, err_msg=str(shape))
    # the second step differs from the first: the update did something
    assert abs(ref[1] - ref[0]) > 1e-4


def test_params_are_sharded_as_the_rules_say():
    cfg = tiny_config()
    _, params, setup = _two_steps(cfg, (2, 2, 2))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    seen = 0
    for path, leaf in flat:
        name = jax.tree_util.keystr(path)
        spec = leaf.sharding.spec
        if "wq" in name:  # [layers, embed, heads] -> (None, fsdp, tensor)
            assert tuple(spec) == (None, "fsdp", "tensor"), name
            assert leaf.addressable_shards[0].data.shape == (2, 16, 16)
            seen += 1
        if "['mlp']['w2']" in name:  # [layers, mlp, embed]
            assert tuple(spec) == (None, "tensor", "fsdp"), name
            seen += 1
        if name.startswith("['decoder']['embedding']"):  # [vocab, embed]
            assert tuple(spec) == ("tensor", "fsdp"), name
            seen += 1
    assert seen == 3


def test_every_logical_name_resolves():
    cfg = tiny_config()
    mesh = sharding.make_mesh(2, 2, 2)
    setup = setup_lib.build_setup(cfg, mesh)
    for s in jax.tree.leaves(setup.param_sh):
        for axis in s.spec:
            for a in (axis,) if isinstance(axis, (str, type(None))) else axis:
                assert a in (None,) + sharding.MESH_AXES


def test_grad_accumulation_equals_one_big_batch():
    losses = {}
    params_out = {}
    for acc in (1, 2, 4):
        cfg = tiny_config(train={"grad_accum": acc})
        l, p, _ = _two_steps(cfg, (1, 1, 1))
        losses[acc], params_out[acc] = l, jax.tree.leaves(p)
    for acc in (2, 4):
        np.testing.assert_allclose(losses[acc], losses[1], rtol=2e-6)
        for a, b in zip(params_out[acc], params_out[1]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_memory_layers_sharded_lookup_matches_one_device():
    """memory_layers with the value columns split over `tensor` (the sharded lookup), the backbone's own tensor
    parallelism off: (2, 2, 2) gives 1 device's losses to the float32 rounding of the data-parallel mean. (With the
    backbone's tensor parallelism on, its split-contraction matmuls change hidden states by ~1 ulp and the
    discontinuous top-k can pick another slot at a near-tie -- session 15: 1 of 8,192 (token, head) pairs at step 1,
    scores 3e-7 apart -- so those runs drift apart over steps; not a bug, see the #4 note.)"""
    model = {"kind": "memory_layers", "n_layers": 3, "max_seq_len": 32,
             "memory_layers": {"num_values": 256, "heads": 2, "top_k": 4, "k_dim": 8, "value_lr": 1e-2, "layers": [1]}}
    no_tp = {"rules": {n: None for n in ("heads", "kv_heads", "mlp", "vocab", "act_heads", "act_vocab")}}
    cfg = tiny_config(model=model, mesh=no_tp)
    ref = np.array(_two_steps(cfg, (1, 1, 1))[0])
    losses, params, _ = _two_steps(cfg, (2, 2, 2))
    values = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
              if "values" in jax.tree_util.keystr(path)]
    assert values and all("tensor" in tuple(v.sharding.spec) for v in values)  # the lookup really is sharded
    assert np.all(np.isfinite(ref)) and abs(ref[1] - ref[0]) > 1e-4
    np.testing.assert_allclose(losses, ref, rtol=2e-6)
