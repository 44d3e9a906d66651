"""AdamW (Loshchilov & Hutter 2019) with linear warmup, cosine decay and global-norm clipping."""

from __future__ import annotations

import jax
import optax


def lr_schedule(train_cfg) -> optax.Schedule:
    """0 -> lr over warmup_steps, then cosine decay to lr * min_lr_ratio at train.steps."""
    warm = train_cfg.warmup_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_cfg.lr,
        warmup_steps=warm,
        decay_steps=max(train_cfg.steps, warm + 1),
        end_value=train_cfg.lr * train_cfg.min_lr_ratio,
    )


def _decay_mask(params):
    """Weight decay on matrices only: not on norm scales (named `scale`) or 1-D parameters."""

    def keep(path, x):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        return x.ndim >= 2 and "scale" not in names

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
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
