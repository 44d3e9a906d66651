"""Memory layers learn facts: on a synthetic key -> value recall task a Memory+ model beats a dense model of
equal FLOPs per token (Berges et al. 2024, arXiv 2412.09764: memory layers add capacity, not compute).

Task: K² facts (a, b) -> c with a, b in [0, K) and c in [0, 64) drawn once at random. A sequence is 16
facts "a b c" back to back; the loss is only on predicting c (from a and b). Both models: d=32, 2 layers;
the memory model replaces layer 1's FFN by a product-key memory (N = 64², 4 heads, top-8, k_dim 32, qk-norm,
shared values at value_lr); the dense model's every FFN gets d_ff = pkm.equal_flops_d_ff (same FFN
FLOPs/token). Both train with the same data, steps and lr schedule through build_setup / jit_train_step; they
are compared on held-out batches (fresh samples of the same facts). Chance is ln 64 = 4.16.

What the comparison measures: both models sit at the ln 64 plateau until layer 0's attention carries `a`
to b's position (seed 0: ~step 250); before that the two are alike. After it the memory stores the facts
within a few hundred steps, and the dense model follows more slowly: seed 0, held-out loss memory / dense:
300 steps 2.38 / 3.51, 600 steps 0.06 / 0.97, 800 steps 0.06 / 0.29. The gap is a window, not a limit: the
dense model also memorises the 4096 facts given enough steps (seed 3 at 600 steps: memory 0.073 / 98.0% vs
dense 0.437 / 90.1%). That short window is what the CI test checks (300 steps).

The slow test checks the claim of the paper instead: memory layers add *capacity* at equal FLOPs. 16,384
facts (6 bits each, ~98k bits) with the memory table grown to match (N = 128² values) against a dense model
of equal FLOPs with 69k parameters, 4,000 steps (each fact seen ~125 times): the memory model stores them,
the dense one saturates well below (about 2/3 of them). Hyperparameters (qk_norm, constant lr, steps, and for
the slow test N and the step count) were chosen on seed 0 only; the slow test runs held-out seeds 1-3.

Measured on the 2-core CI box (see the lead's BENCHMARKS.md for the numbers reported with this test).
"""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest
from flax import nnx

from memlm import distributed
from memlm.config import from_dict
from memlm.memory import pkm
from memlm.train import setup as setup_lib
from tests.memory.common import fit

pytestmark = pytest.mark.integration

N_VALUES_OUT, FACTS_PER_SEQ, BATCH = 64, 16, 32


def fact_batch(table: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """[BATCH, 1, 48] sequences of facts "a b c"; loss_mask = 1 where the target is c."""
    k = table.shape[0]
    r = np.random.default_rng(seed)
    a, b = r.integers(0, k, (BATCH, FACTS_PER_SEQ)), r.integers(0, k, (BATCH, FACTS_PER_SEQ))
    seq = np.stack([3 + a, 3 + k + b, 3 + 2 * k + table[a, b]], -1).reshape(BATCH, -1)
    toks = np.concatenate([seq, np.full((BATCH, 1), 2)], 1)
    n = seq.shape[1]
    mask = np.zeros((BATCH, n), np.float32)
    mask[:, 1::3] = 1.0  # at b's position the next token is c
    shape = (BATCH, 1, n)
    return {"tokens": toks[:, :-1].reshape(shape).astype(np.int32),
            "targets": toks[:, 1:].reshape(shape).astype(np.int32),
            "positions": np.broadcast_to(np.arange(n), shape).astype(np.int32).copy(),
            "loss_mask": mask.reshape(shape), "reset": np.ones((BATCH, 1), bool)}


# Both models: constant lr after a 20-step warmup (min_lr_ratio 1). Chosen on seed 0: with the default cosine
# decay the lr has mostly decayed by the time the models leave the ln 64 plateau (~step 250, when attention
# starts carrying `a` to b's position), which is when the memory starts storing facts.
TRAIN = {"batch_size": BATCH, "lr": 3e-3, "warmup_steps": 20, "min_lr_ratio": 1.0, "weight_decay": 0.0}


def train_and_eval(model: dict, table: np.ndarray, steps: int, seed: int = 0) -> dict:
    k = table.shape[0]
    cfg = from_dict({
        "run": {"dir": "/tmp/unused"},
        "train": {"steps": steps, "progress": False, **TRAIN},
        "model": {"vocab_size": max(259, 3 + 2 * k + N_VALUES_OUT), "d_model": 32, "n_layers": 2, "n_heads": 4,
                  "d_ff": 128, "max_seq_len": 64, "dtype": "float32", "remat": "none", **model},
        "data": {"source": "synthetic", "n_segments": 1, "segment_len": 3 * FACTS_PER_SEQ}})
    t0 = time.perf_counter()
    setup, params, _, _ = fit(cfg, lambda i: fact_batch(table, seed * 10**5 + i), seed)
    with setup.activate():

        @jax.jit
        def evaluate(p, batch):
            model = nnx.merge(setup.graphdef, p)
            b, _, n = batch["tokens"].shape  # one document per row: positions are arange(n)
            loss_sum, count, _, _ = model.loss({}, batch)
            logits = model.full_logits(batch["tokens"].reshape(b, n))
            hit = (logits.argmax(-1) == batch["targets"].reshape(b, n)) * batch["loss_mask"].reshape(b, n)
            return loss_sum / count, hit.sum() / count

        res = [evaluate(params, distributed.to_global(fact_batch(table, 10**6 + j), setup.batch_sh)) for j in range(4)]
    loss, acc = (float(np.mean([float(r[i]) for r in res])) for i in range(2))
    return {"cfg": cfg, "loss": loss, "acc": acc, "train_s": time.perf_counter() - t0,
            "params": setup_lib.param_count(setup.abstract_params)}


# qk_norm (Berges et al. Fig. 3, "when needed"): without it the keys can collapse onto a few slots (seed 0:
# 1-10% of the 4096 slots used per batch at value_lr 0.01 or 0.03, at lr 1e-2, with no warmup, or with 8 heads
# of top-4), and the memory then only learns the marginal of c; with it 83-97% of them are used.
MEMORY = {"kind": "memory_layers", "memory_layers": {"layers": [1], "num_values": 4096, "heads": 4, "top_k": 8,
                                                     "k_dim": 32, "memory_plus": True, "qk_norm": True,
                                                     "value_lr": 0.1}}


def compare(k: int, steps: int, seed: int = 0, num_values: int = 4096) -> tuple[dict, dict]:
    table = np.random.default_rng(seed).integers(0, N_VALUES_OUT, size=(k, k))
    memory = {**MEMORY, "memory_layers": {**MEMORY["memory_layers"], "num_values": num_values}}
    mem = train_and_eval(memory, table, steps, seed)
    d_ff = pkm.equal_flops_d_ff(mem["cfg"].model)
    dense = train_and_eval({"d_ff": d_ff}, table, steps, seed)
    flops = pkm.memory_flops_per_token(mem["cfg"].model)
    print(f"\nfacts={k * k} steps={steps} seed={seed}: memory loss {mem['loss']:.3f} acc {mem['acc']:.3f} "
          f"({mem['params']:,} params, {mem['train_s']:.0f} s) | dense d_ff={d_ff} loss {dense['loss']:.3f} "
          f"acc {dense['acc']:.3f} ({dense['params']:,} params, {dense['train_s']:.0f} s) | "
          f"memory layer {flops} FLOPs/token vs SwiGLU(128) {6 * 32 * 128}")
    return mem, dense


def test_memory_beats_equal_flops_dense_on_fact_recall_short():
    mem, dense = compare(k=64, steps=300)
    assert mem["loss"] < dense["loss"] - 0.2, (mem["loss"], dense["loss"])


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_memory_beats_equal_flops_dense_on_fact_recall_full(seed):
    """Capacity regime: 16,384 facts, N = 128² values, 4,000 steps, three held-out fact tables and inits (settings
    chosen on seed 0: memory 0.372 / 90.5% vs dense 1.260 / 65.3%). Measured (held-out loss / acc, memory vs
    dense; ~13 min per seed on one CPU core): seed 1 0.047 / 98.5% vs 1.179 / 66.7%, seed 2 0.034 / 98.9% vs
    1.435 / 63.0%, seed 3 0.044 / 98.6% vs 1.354 / 63.0%. (The earlier slow test, 4,096 facts at 600 steps,
    measured the short window before the dense model catches up and failed on seed 3; see the module
    docstring.)"""
    mem, dense = compare(k=128, steps=4000, seed=seed, num_values=128 * 128)
    assert mem["loss"] < dense["loss"] - 0.5, (mem["loss"], dense["loss"])
    assert mem["acc"] > dense["acc"] + 0.1, (mem["acc"], dense["acc"])
