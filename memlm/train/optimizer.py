"""AdamW (Loshchilov & Hutter 2019) with linear warmup, cosine (or linear) decay and global-norm clipping.

Memory layers (`model.kind: memory_layers`, Berges et al. 2024 §4 / models.md §6(b)) put the product-key
values (every parameter named `values`) in their own group: learning rate `memory_layers.value_lr` times the
schedule's shape (schedule(step) / train.lr), gradients clipped to `train.grad_clip` separately from the other
parameters, and weight decay like the other matrices (the official code runs one AdamW over every group;
models.md §6(g)) unless `memory_layers.value_weight_decay: false`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def lr_schedule(train_cfg) -> optax.Schedule:
    """0 -> lr over warmup_steps, then cosine (or, with `lr_decay: linear`, linear) decay to lr * min_lr_ratio at
    train.steps."""
    warm = train_cfg.warmup_steps
    if train_cfg.lr_decay == "linear":
        end = train_cfg.lr * train_cfg.min_lr_ratio
        return optax.join_schedules(
            [optax.linear_schedule(0.0, train_cfg.lr, warm),
             optax.linear_schedule(train_cfg.lr, end, max(train_cfg.steps - warm, 1))], [warm])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_cfg.lr,
        warmup_steps=warm,
        decay_steps=max(train_cfg.steps, warm + 1),
        end_value=train_cfg.lr * train_cfg.min_lr_ratio,
    )


def _names(path) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def _decay_mask(params):
    """Weight decay on matrices only: not on norm scales (named `scale`) or 1-D parameters."""

    def keep(path, x):
        return x.ndim >= 2 and "scale" not in _names(path)

    return jax.tree_util.tree_map_with_path(keep, params)


def is_value_param(path) -> bool:
    """A product-key value table (memory layers): a parameter named `values`."""
    return "values" in _names(path)


def _groups(tree):
    return jax.tree_util.tree_map_with_path(lambda path, _: is_value_param(path), tree)


def clip_by_group_norm(max_norm: float) -> optax.GradientTransformation:
    """Global-norm clipping applied separately to the values group and to every other parameter."""

    def update(updates, state, params=None):
        del params
        groups = _groups(updates)
        leaves, is_val = jax.tree.leaves(updates), jax.tree.leaves(groups)
        sq = [jnp.sum(jnp.square(u.astype(jnp.float32))) for u in leaves]
        norms = {g: jnp.sqrt(sum((s for s, v in zip(sq, is_val) if v == g), jnp.float32(0))) for g in (True, False)}
        scale = {g: jnp.where(n < max_norm, 1.0, max_norm / jnp.maximum(n, 1e-30)) for g, n in norms.items()}
        updates = jax.tree.map(lambda u, g: (u * scale[g]).astype(u.dtype), updates, groups)
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_by_group_schedule(schedule: optax.Schedule, value_ratio: float) -> optax.GradientTransformation:
    """updates * -schedule(step), and * value_ratio more for the values group."""

    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        step = -schedule(state.count)
        updates = jax.tree.map(lambda u, v: (u * (step * (value_ratio if v else 1.0))).astype(u.dtype),
                               updates, _groups(updates))
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def make_optimizer(train_cfg, model_cfg=None) -> optax.GradientTransformation:
    """AdamW for `train_cfg`; `model_cfg` (optional) adds the memory-layer values group."""
    ml = getattr(model_cfg, "memory_layers", None) if getattr(model_cfg, "kind", None) == "memory_layers" else None
    if ml is not None:
        def mask(params):
            decay = _decay_mask(params)
            return jax.tree.map(lambda d, v: d and (ml.value_weight_decay or not v), decay, _groups(params))

        parts = [clip_by_group_norm(train_cfg.grad_clip)] if train_cfg.grad_clip > 0 else []
        parts += [
            optax.scale_by_adam(b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps),
            optax.add_decayed_weights(train_cfg.weight_decay, mask),
            scale_by_group_schedule(lr_schedule(train_cfg), ml.value_lr / train_cfg.lr),
        ]
        return optax.chain(*parts)
    parts = []
    if train_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
    parts.append(
        optax.adamw(
            lr_schedule(train_cfg),
            b1=train_cfg.b1,
            b2=train_cfg.b2,
            eps=train_cfg.eps,
            weight_decay=train_cfg.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts)
