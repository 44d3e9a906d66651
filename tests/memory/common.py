"""Helpers shared by memory-model tests: build a model, make batches, stream segments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memlm import sharding
from memlm.config import from_dict
from memlm.models.lm import build_model

SMALL = {"vocab_size": 259, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64,
         "max_seq_len": 64, "dtype": "float32", "remat": "none", "tie_embeddings": False}


def make(kind: str, seg_len: int = 8, n_seg: int = 4, batch: int = 2, seed: int = 0, **model):
    raw = {"model": {**SMALL, "kind": kind, **model},
           "data": {"source": "synthetic", "segment_len": seg_len, "n_segments": n_seg},
           "train": {"batch_size": batch}}
    cfg = from_dict(raw)
    with sharding.activate(sharding.make_mesh(1, 1, 1, jax.devices()[:1])):
        return cfg, build_model(cfg.model, nnx.Rngs(seed))


def make_batch(cfg, seed: int = 0, lo: int = 3, hi: int = 259) -> dict:
    b, s, l = cfg.train.batch_size, cfg.data.n_segments, cfg.data.segment_len
    rng = np.random.default_rng(seed)
    toks = rng.integers(lo, hi, size=(b, s * l + 1)).astype(np.int32)
    reset = np.zeros((b, s), bool)
    reset[:, 0] = True
    return {
        "tokens": jnp.asarray(toks[:, :-1].reshape(b, s, l)),
        "targets": jnp.asarray(toks[:, 1:].reshape(b, s, l)),
        "positions": jnp.asarray(np.broadcast_to(np.arange(s * l).reshape(s, l), (b, s, l)).copy()),
        "loss_mask": jnp.ones((b, s, l), jnp.float32),
        "reset": jnp.asarray(reset),
    }


def stream_logits(model, tokens: jax.Array, seg_len: int) -> jax.Array:
    """Feed [batch, T] tokens one segment at a time with the carry; concatenate the logits."""
    carry = model.init_carry(tokens.shape[0])
    out = []
    for start in range(0, tokens.shape[1], seg_len):
        seg = tokens[:, start : start + seg_len]
        pos = jnp.broadcast_to(jnp.arange(start, start + seg.shape[1]), seg.shape)
        logits, carry = model.segment_logits(carry, seg, pos)
        out.append(logits)
    return jnp.concatenate(out, axis=1)
