"""SwiGLU feed-forward (Shazeer 2020, eq. 6): FFN(x) = W2 (SiLU(x W1) * x W3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memlm.layers.attention import _linear


class SwiGLU(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.ff
        self.w1 = _linear(d, f, ("embed", "mlp"), cfg, rngs, cfg.init_std)
        self.w3 = _linear(d, f, ("embed", "mlp"), cfg, rngs, cfg.init_std)
        self.w2 = _linear(f, d, ("mlp", "embed"), cfg, rngs, cfg.init_std / (2 * cfg.n_layers) ** 0.5)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, seq, d_model] -> [batch, seq, d_model]."""
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


def rms_norm(cfg, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """RMSNorm (Zhang & Sennrich 2019): x / rms(x) * g, computed in float32."""
    return nnx.RMSNorm(
        cfg.d_model,
        epsilon=cfg.norm_eps,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        rngs=rngs,
    )
