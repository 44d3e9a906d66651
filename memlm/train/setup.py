"""Everything a step needs, built under the mesh: model graph, sharded params/optimizer/carry, jitted steps.

Abstract (shape-only) versions come first; real arrays are created by jitted initializers whose outputs are
already sharded. `memlm compile` uses only the abstract half, so paper-scale configs can be checked for fit
on fake devices without allocating them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from memlm import sharding
from memlm.errors import UserError
from memlm.models.lm import build_model
from memlm.train.optimizer import make_optimizer
from memlm.train.step import make_eval_step, make_train_step

BATCH_KEYS_INT = ("tokens", "targets", "positions")


@dataclass
class Setup:
    cfg: Any
    mesh: Mesh
    rules: tuple
    graphdef: Any
    abstract_params: Any
    param_sh: Any
    tx: optax.GradientTransformation
    abstract_opt: Any
    opt_sh: Any
    abstract_carry: Any
    carry_sh: Any
    batch_sh: dict
    global_batch: int

    def activate(self):
        return sharding.activate(self.mesh, self.rules)


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def batch_spec(cfg) -> dict[str, jax.ShapeDtypeStruct]:
    b, s, l = cfg.train.batch_size, cfg.data.n_segments, cfg.data.segment_len
    spec = {k: jax.ShapeDtypeStruct((b, s, l), jnp.int32) for k in BATCH_KEYS_INT}
    spec["loss_mask"] = jax.ShapeDtypeStruct((b, s, l), jnp.float32)
    spec["reset"] = jax.ShapeDtypeStruct((b, s), jnp.bool_)
    return spec


def check_layout(setup: Setup) -> None:
    """UserError unless train.batch_size and every parameter and carry array split evenly over the mesh axes
    they are sharded on (checked before a step is compiled or a run dir is written)."""
    spec = setup.batch_sh["tokens"].spec
    names = spec[0] if len(spec) else None
    names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
    shards = int(np.prod([setup.mesh.shape[a] for a in names]))
    if setup.global_batch % shards:
        axes = " x ".join(f"{a}={setup.mesh.shape[a]}" for a in names)
        raise UserError(f"train.batch_size={setup.global_batch} is not divisible by the {shards} devices the batch "
                        f"is split over (mesh {axes})")
    mesh = ", ".join(f"{a}={n}" for a, n in setup.mesh.shape.items())
    for what, tree in (("parameter", setup.abstract_params), ("memory carry", setup.abstract_carry)):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            try:
                leaf.sharding.shard_shape(leaf.shape)
            except ValueError:
                name = jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value")
                raise UserError(f"{what} {name} of shape {leaf.shape} does not split evenly over mesh ({mesh}) "
                                f"as {leaf.sharding.spec}: choose mesh sizes that divide it") from None


def build_setup(cfg, mesh: Mesh, batch_size: int | None = None) -> Setup:
    """Abstract model, optimizer and carry with their shardings on `mesh` (no arrays are allocated)."""
    rules = sharding.rules(cfg.mesh.rules)
    b = batch_size or cfg.train.batch_size
    with sharding.activate(mesh, rules):
        graphdef, abstract_params = nnx.get_abstract_model(lambda: build_model(cfg.model, nnx.Rngs(0)), mesh)
        param_sh = nnx.get_named_sharding(abstract_params, mesh)
        tx = make_optimizer(cfg.train, cfg.model)
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        opt_sh = optax.tree_map_params(
            tx,
            lambda _, s: s,
            abstract_opt,
            param_sh,
            transform_non_params=lambda _: sharding.replicated(mesh),
        )
        abstract_opt = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_opt, opt_sh
        )
        model = nnx.merge(graphdef, abstract_params)
        carry_names = model.carry_axes()
        abstract_carry = jax.eval_shape(lambda p: nnx.merge(graphdef, p).init_carry(b), abstract_params)
        carry_sh = jax.tree.map(lambda n: sharding.named(mesh, n, rules), carry_names, is_leaf=_is_names)
        abstract_carry = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_carry, carry_sh
        )
        spec = batch_spec(cfg)
        batch_sh = {k: sharding.batch_sharding(mesh, v.ndim, rules) for k, v in spec.items()}
    return Setup(cfg, mesh, rules, graphdef, abstract_params, param_sh, tx, abstract_opt, opt_sh,
                 abstract_carry, carry_sh, batch_sh, b)


def init_params(setup: Setup, seed: int):
    """Jitted, sharded parameter init (same values on every mesh)."""
    cfg = setup.cfg

    def init():
        return nnx.state(build_model(cfg.model, nnx.Rngs(seed)))

    with setup.activate():
        return jax.jit(init, out_shardings=setup.param_sh)()


def init_opt_state(setup: Setup, params):
    with setup.activate():
        return jax.jit(setup.tx.init, out_shardings=setup.opt_sh)(params)


def init_carry(setup: Setup, params, batch: int | None = None):
    b = batch or setup.global_batch
    with setup.activate():
        return jax.jit(lambda p: nnx.merge(setup.graphdef, p).init_carry(b), out_shardings=setup.carry_sh)(params)


def jit_train_step(setup: Setup):
    cfg = setup.cfg
    step = make_train_step(setup.graphdef, setup.tx, cfg.train.bptt_depth, cfg.train.grad_accum)
    metrics_sh = sharding.replicated(setup.mesh)
    return jax.jit(
        step,
        in_shardings=(setup.param_sh, setup.opt_sh, setup.carry_sh, setup.batch_sh),
        out_shardings=(setup.param_sh, setup.opt_sh, setup.carry_sh, metrics_sh),
        donate_argnums=(0, 1, 2),
    )


def jit_eval_step(setup: Setup, batch_sh: dict | None = None, carry_sh=None):
    rep = sharding.replicated(setup.mesh)
    carry_sh = setup.carry_sh if carry_sh is None else carry_sh
    return jax.jit(
        make_eval_step(setup.graphdef),
        in_shardings=(setup.param_sh, carry_sh, batch_sh or setup.batch_sh),
        out_shardings=(rep, rep, carry_sh),
    )


def param_count(abstract_params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params)))
