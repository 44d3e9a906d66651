"""The pure train step: (params, opt_state, carry, batch) -> (params, opt_state, carry, metrics).

Gradient accumulation splits the batch rows into `grad_accum` micro-batches (rows a, a+A, a+2A, ... so each
device keeps its own rows), sums the *summed* token losses and gradients, and divides once by the total
number of target tokens, so the update is identical to one large batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def make_loss_fn(graphdef, bptt_depth: int) -> Callable:
    def loss_fn(params, carry, batch):
        model = nnx.merge(graphdef, params)
        loss_sum, n, new_carry, aux = model.loss(carry, batch, bptt_depth)
        return loss_sum, (n, new_carry, aux)

    return loss_fn


def _split_micro(tree, a: int):
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // a, a) + x.shape[1:]), 0, 1), tree)


def _join_micro(tree):
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:]), tree)


def make_train_step(graphdef, tx: optax.GradientTransformation, bptt_depth: int, grad_accum: int) -> Callable:
    loss_fn = make_loss_fn(graphdef, bptt_depth)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(params, opt_state, carry, batch):
        if grad_accum == 1:
            (loss_sum, (n, carry, aux)), grads = grad_fn(params, carry, batch)
        else:
            micro_batches, micro_carry = _split_micro(batch, grad_accum), _split_micro(carry, grad_accum)

            def body(acc, xs):
                g_acc, l_acc, n_acc = acc
                mb, mc = xs
                (l, (n_i, c_i, aux_i)), g = grad_fn(params, mc, mb)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n_i), (c_i, aux_i)

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss_sum, n), (carries, auxs) = jax.lax.scan(
                body, (zeros, jnp.float32(0), jnp.float32(0)), (micro_batches, micro_carry)
            )
            carry = _join_micro(carries)
            aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), auxs)
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm, "tokens": n, **aux}
        return params, opt_state, carry, metrics

    return step


def make_eval_step(graphdef) -> Callable:
    """(params, carry, batch) -> (loss_sum, n_tokens, new_carry); no gradients."""
    loss_fn = make_loss_fn(graphdef, -1)

    def step(params, carry, batch):
        loss_sum, (n, carry, _) = loss_fn(params, carry, batch)
        return loss_sum, n, carry

    return step
