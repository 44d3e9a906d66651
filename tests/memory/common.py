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


def stacked_layer(blocks, i: int):
    """Layer i of a stacked block module (make_stacked_blocks), as its own module."""
    graphdef, stacked = nnx.split(blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))


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


def recall_batch(corpus, start: int, n: int, segment_len: int) -> dict[str, np.ndarray]:
    """Documents start..start+n-1 of an AssociativeRecallCorpus as one batch (one document per row):
    tokens/targets/positions/loss_mask [n, S, L], reset [n, S] (True at segment 0)."""
    docs = np.stack([corpus.doc(i) for i in range(start, start + n)])
    mask = np.stack([corpus.doc_loss_mask(i) for i in range(start, start + n)])
    s = (docs.shape[1] - 1) // segment_len
    shape = (n, s, segment_len)
    reset = np.zeros((n, s), bool)
    reset[:, 0] = True
    return {"tokens": docs[:, :-1].reshape(shape).astype(np.int32),
            "targets": docs[:, 1:].reshape(shape).astype(np.int32),
            "positions": np.broadcast_to(np.arange(s * segment_len).reshape(s, segment_len), shape).astype(np.int32),
            "loss_mask": mask.reshape(shape).astype(np.float32), "reset": reset}


def fit(cfg, next_batch, seed: int = 0, params=None, log_every: int = 0, label: str = "loss"):
    """Train cfg.train.steps steps on one device with the real jitted train step (fresh optimizer state; from
    `params` if given, else a fresh init with `seed`). next_batch(i) -> numpy batch for step i.

    Returns (setup, params, last step's metrics, training seconds)."""
    import time

    from memlm import distributed
    from memlm.train import setup as setup_lib

    setup = setup_lib.build_setup(cfg, sharding.make_mesh(1, 1, 1, jax.devices()[:1]))
    params = setup_lib.init_params(setup, seed) if params is None else params
    opt = setup_lib.init_opt_state(setup, params)
    carry = setup_lib.init_carry(setup, params)
    step = setup_lib.jit_train_step(setup)
    metrics: dict = {}
    t0 = time.perf_counter()
    with setup.activate():
        for i in range(cfg.train.steps):
            batch = distributed.to_global(next_batch(i), setup.batch_sh)
            params, opt, carry, metrics = step(params, opt, carry, batch)
            if log_every and (i + 1) % log_every == 0:  # progress of long runs (pytest -s)
                print(f"  step {i + 1}: {label} {float(metrics['loss']):.3f} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    return setup, params, metrics, time.perf_counter() - t0


def model_loss(gd, batch: dict):
    """params -> the summed training loss of the model with graph `gd` on `batch`, from its initial carry."""
    def loss(p):
        m = nnx.merge(gd, p)
        return m.loss(m.init_carry(batch["tokens"].shape[0]), batch)[0]
    return loss


def assert_same_loss_and_grads(got, want, what: str = "") -> None:
    """Two (loss, gradient tree) pairs of programs that differ only in schedule: float32 round-off apart (loss to
    1e-6 relative, each gradient leaf to 1e-5 of its norm)."""
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6, err_msg=what)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b) + 1e-12, what


def dots_by_scan_depth(jaxpr, depth: int = 0, counts: dict | None = None) -> dict[int, int]:
    """{number of enclosing scans: dot_generals there} of a jaxpr, sub-jaxprs (vmap, checkpoint, cond) included."""
    counts = {} if counts is None else counts
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            counts[depth] = counts.get(depth, 0) + 1
        for sub in jax.core.jaxprs_in_params(eqn.params):
            dots_by_scan_depth(sub, depth + (eqn.primitive.name == "scan"), counts)
    return counts
