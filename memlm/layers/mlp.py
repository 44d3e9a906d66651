"""Feed-forward layers and norms.

Llama backbone: SwiGLU (Shazeer 2020, eq. 6) FFN(x) = W2 (SiLU(x W1) * x W3) and RMSNorm.
GPT-2 backbone (`model.arch=gpt2`, Radford et al. 2019): FFN(x) = GELU_tanh(x W1 + b1) W2 + b2 and LayerNorm
with a bias (Ba et al. 2016).
"""

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


class GeluMLP(nnx.Module):
    """GPT-2 feed-forward: W2 GELU(x W1 + b1) + b2 with the tanh approximation of GELU ("gelu_new")."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.ff
        self.w1 = _linear(d, f, ("embed", "mlp"), cfg, rngs, cfg.init_std, bias=True)
        self.w2 = _linear(f, d, ("mlp", "embed"), cfg, rngs, cfg.init_std / (2 * cfg.n_layers) ** 0.5, bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, seq, d_model] -> [batch, seq, d_model]."""
        return self.w2(jax.nn.gelu(self.w1(x), approximate=True))


def layer_norm(cfg, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm (x - mean) / sqrt(var + eps) * g + b, statistics in float32 with the two-pass variance."""
    return nnx.LayerNorm(
        cfg.d_model,
        epsilon=cfg.norm_eps,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        use_fast_variance=False,  # mean((x - mean)^2), as torch.nn.LayerNorm, not E[x^2] - E[x]^2
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
        rngs=rngs,
    )


def make_norm(cfg, rngs: nnx.Rngs) -> nnx.Module:
    """The backbone's norm: RMSNorm (llama) or LayerNorm with bias (gpt2)."""
    return layer_norm(cfg, rngs) if cfg.arch == "gpt2" else rms_norm(cfg, rngs)


def make_mlp(cfg, rngs: nnx.Rngs) -> nnx.Module:
    """The backbone's feed-forward: SwiGLU (llama) or GELU MLP with biases (gpt2)."""
    return GeluMLP(cfg, rngs) if cfg.arch == "gpt2" else SwiGLU(cfg, rngs)
