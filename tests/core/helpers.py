"""Shared helpers for core tests: tiny configs and random batches."""

from __future__ import annotations

import numpy as np

from memlm.config import from_dict

TINY_MODEL = {"vocab_size": 259, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64,
              "max_seq_len": 256, "dtype": "float32", "remat": "none"}


def tiny_config(**sections) -> object:
    raw = {
        "run": {"dir": "/tmp/unused", "seed": 0},
        "train": {"steps": 4, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1, "log_every": 1,
                  "checkpoint_every": 100, "progress": False},
        "model": dict(TINY_MODEL),
        "data": {"source": "synthetic", "n_segments": 2, "segment_len": 16},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return from_dict(raw)


def random_batch(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """A [batch, n_segments, segment_len] batch of random tokens; a document starts at segment 0 of each row
    and a second one at the last segment of odd rows."""
    b, s, l = cfg.train.batch_size, cfg.data.n_segments, cfg.data.segment_len
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.model.vocab_size, size=(b, s, l + 1)).astype(np.int32)
    reset = np.zeros((b, s), bool)
    reset[:, 0] = True
    if s > 1:
        reset[1::2, -1] = True
    positions = np.zeros((b, s, l), np.int32)
    for i in range(b):
        p = 0
        for j in range(s):
            if reset[i, j]:
                p = 0
            positions[i, j] = np.arange(p, p + l)
            p += l
    mask = np.ones((b, s, l), np.float32)
    mask[0, -1, l // 2 :] = 0.0  # a padded tail
    return {"tokens": tokens[..., :-1], "targets": tokens[..., 1:], "positions": positions,
            "loss_mask": mask, "reset": reset}
