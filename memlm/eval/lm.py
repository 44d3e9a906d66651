"""`memlm eval lm`: token-level perplexity of a run on a split of its configured data."""

from __future__ import annotations

import json
import math
import os

import jax

from memlm.data import pipeline
from memlm.sharding import make_mesh
from memlm.train import setup as setup_lib
from memlm.train.loop import evaluate_loss


def eval_lm(run_dir: str, split: str, max_batches: int | None = None, out: str | None = None) -> dict:
    """Mean token NLL and perplexity over `split`, streamed in training-shaped batches with memory carried."""
    from memlm import api

    lm = api.load(run_dir)
    cfg = lm.config
    tokenizer = lm.tokenizer
    corpus = pipeline.get_corpus(cfg, split, tokenizer)
    b = cfg.train.batch_size
    batches = pipeline.eval_batches(cfg, corpus, max_batches)
    devices = jax.local_devices()[:1]
    setup = setup_lib.build_setup(cfg, make_mesh(1, 1, 1, devices))
    with setup.activate():
        params = jax.device_put(lm._params, setup.param_sh)
    eval_step = setup_lib.jit_eval_step(setup)
    nll = evaluate_loss(setup, eval_step, params, batches, list(range(b)))
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
