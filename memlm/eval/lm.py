"""`memlm eval lm`: token-level perplexity of a run on a split of its configured data."""

from __future__ import annotations

import json
import math
import os

import jax

from memlm.data import pipeline
from memlm.errors import DIVERGENCE_HINT, NonFiniteOutput, UserError
from memlm.sharding import make_mesh
from memlm.train import setup as setup_lib
from memlm.train.loop import evaluate_loss


class WindowedCorpus:
    """Documents cut into windows of `window` targets (overlapping by one token, so every target is scored
    once). For models without memory this is exactly their training context (the batcher starts every
    document at a step boundary and the baseline attends within a step), and it fills every batch slot."""

    def __init__(self, corpus, window: int):
        self._corpus, self._spans = corpus, []
        for i, n in enumerate(corpus.doc_lengths):
            for start in range(0, max(int(n) - 1, 0), window):
                self._spans.append((i, start, min(start + window + 1, int(n))))
        self.name = f"{corpus.name}-windows{window}"
        self.pad_id = getattr(corpus, "pad_id", 0)

    @property
    def doc_lengths(self):
        import numpy as np

        return np.array([b - a for _, a, b in self._spans], np.int64)

    @property
    def num_docs(self) -> int:
        return len(self._spans)

    @property
    def total_tokens(self) -> int:
        return int(self.doc_lengths.sum())

    def doc(self, j: int):
        i, a, b = self._spans[j]
        return self._corpus.doc(i)[a:b]


def eval_lm(run_dir: str, split: str, max_batches: int | None = None, out: str | None = None,
            step: int | None = None) -> dict:
    """Mean token NLL and perplexity over `split`, streamed in training-shaped batches with memory carried
    (checkpoint `step`, default the latest)."""
    from memlm import api

    if max_batches is not None and max_batches < 1:
        raise UserError(f"--max-batches: must be >= 1, got {max_batches}")
    if out and os.path.isdir(out):
        raise UserError(f"--out {out}: is a directory (give the path of the result JSON)")
    lm = api.load(run_dir, step)
    cfg = lm.config
    tokenizer = lm.tokenizer
    corpus = pipeline.get_corpus(cfg, split, tokenizer)
    b = cfg.train.batch_size
    if lm.stateless:
        corpus = WindowedCorpus(corpus, cfg.data.n_segments * cfg.data.segment_len)
    batches = pipeline.eval_batches(cfg, corpus, max_batches)
    devices = jax.local_devices()[:1]
    setup = setup_lib.build_setup(cfg, make_mesh(1, 1, 1, devices))
    with setup.activate():
        params = jax.device_put(lm._params, setup.param_sh)
    eval_step = setup_lib.jit_eval_step(setup)
    nll = evaluate_loss(setup, eval_step, params, batches, list(range(b)))
    if not math.isfinite(nll):
        raise NonFiniteOutput(f"eval lm {run_dir} ({split}): the mean token NLL is {nll} ({DIVERGENCE_HINT})")
    result = {
        "run": os.path.abspath(run_dir),
        "step": lm.step,
        "split": split,
        "tokenizer": tokenizer.name,
        "batches": len(batches),
        "token_nll": nll,
        "token_perplexity": math.exp(min(nll, 700)),
        "bits_per_token": nll / math.log(2),
    }
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    return result
